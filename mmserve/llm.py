"""The offline API, in vLLM's shape: ``LLM(model=...)``, ``generate`` and ``chat``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jinja2
from tqdm import tqdm

from mmserve.engine.config import EngineConfig
from mmserve.engine.engine import LLMEngine
from mmserve.engine.outputs import RequestOutput
from mmserve.engine.warmup import default_cache_dir, use_compilation_cache
from mmserve.sampling_params import SamplingParams, checked_defaults
from models.qwen3_vl_moe import load_model

ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}


class LLM:
    """model: ``"tiny"``, a Hugging Face checkpoint directory or an orbax directory. dtype:
    ``float32``, ``bfloat16`` or ``auto`` (the checkpoint's, as vLLM's). moe_dispatch:
    how MoE layers reach their experts (``auto``: the fast strategy for this backend).
    compilation_cache: directory of jax's persistent cache of compiled programs (None: the default,
    ``$MMSERVE_COMPILATION_CACHE`` or ``~/.cache/mmserve/jax``; '': off).
    Engine settings (``page_size``, ``max_model_len``, ``num_pages``, ``precompile``, ...) are keyword
    arguments."""

    def __init__(self, model: str = "tiny", dtype: str = "auto", moe_dispatch: str = "auto",
                 compilation_cache: str | None = None, **engine_args):
        unknown = set(engine_args) - ENGINE_FIELDS
        if unknown:
            raise ValueError(f"unknown engine argument(s): {sorted(unknown)}")
        use_compilation_cache(default_cache_dir() if compilation_cache is None else compilation_cache)
        loaded = load_model(model, dtype=dtype, moe_dispatch=moe_dispatch)
        self.model = dataclasses.replace(loaded, sampling_defaults=checked_defaults(loaded.sampling_defaults))
        self.engine = LLMEngine(self.model, EngineConfig(**engine_args))

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generates for one prompt or a list (or tuple); every prompt is validated before any is run.
        One output per prompt, with ``n`` completions where its params ask for n sequences."""
        prompts = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts]
        params = _per_prompt(self.get_default_sampling_params() if sampling_params is None else sampling_params,
                             len(prompts))
        prepared = [self.engine.prepare(p) for p in prompts]
        ids: list[str] = []
        for prompt, p in zip(prepared, params):
            self.engine.check_fits(len(prompt.token_ids), p)
        try:
            features = self.engine.encode_prompts(prepared)
            for prompt, p, f in zip(prepared, params, features):
                ids.extend(self.engine.add_request(prompt, p.sibling(i), features=f) for i in range(p.n))
            outputs = iter(self._run(ids, use_tqdm))
            return [_one_output([next(outputs) for _ in range(p.n)], _prompt_text(prompt))
                    for p, prompt in zip(params, prompts)]
        except BaseException:
            # a bad prompt, a failed step, Ctrl-C: what this call added leaves the engine, so the
            # next call starts from a clean engine (aborting a finished request does nothing)
            for request_id in ids:
                self.engine.abort(request_id)
            raise

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``generate`` and ``chat`` sample with when given no params: the checkpoint's
        recommended sampling (``generation_config.json``), as vLLM's ``LLM`` does."""
        return SamplingParams(**self.model.sampling_defaults)

    def chat(self, messages, sampling_params: SamplingParams | None = None, use_tqdm: bool = False,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             tools: list[dict[str, Any]] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """One conversation (a list of messages) or a list of them. Image and video parts carry the
        media itself: ``{"type": "image", "image": PIL.Image}``, ``{"type": "video", "video": frames}``.
        As vLLM's: ``continue_final_message`` (with ``add_generation_prompt=False``) continues the
        final message instead of starting a new answer; ``tools`` (OpenAI function tools) and
        ``chat_template_kwargs`` reach the chat template. The tools' calls are not parsed: the text
        holds them as the model wrote them."""
        if clash := sorted(set(chat_template_kwargs or {}) & self.model.tokenizer.reserved_template_names):
            raise ValueError(f"chat_template_kwargs cannot set {', '.join(clash)}")
        options = (chat_template_kwargs or {}) | {"add_generation_prompt": add_generation_prompt,
                                                  "continue_final_message": continue_final_message, "tools": tools}
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self._chat_prompt(conversation, options) for conversation in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _chat_prompt(self, conversation: list[dict[str, Any]], options: dict[str, Any]) -> dict[str, Any]:
        """The prompt of one conversation; ValueError for a malformed one, as vLLM's chat does."""
        if not isinstance(conversation, list) or not conversation:
            raise ValueError(f"a conversation must be a non-empty list of messages, got {conversation!r:.80}")
        media: dict[str, list] = {"image": [], "video": []}
        for i, message in enumerate(conversation):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ValueError(f"message {i} must be a dict with a string 'role', got {message!r:.80}")
            content = message.get("content")
            if content is not None and not isinstance(content, (str, list)):
                raise ValueError(f"message {i}'s content must be a string or a list of parts, got {content!r:.80}")
            for part in content if isinstance(content, list) else []:
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise ValueError(f"message {i}'s parts must be dicts with a string 'type', got {part!r:.80}")
                kind = part["type"]
                if kind in media:
                    if kind not in part:
                        raise ValueError(f"a {kind} part must carry the {kind} under the key {kind!r}")
                    media[kind].append(part[kind])
        try:
            text = self.model.tokenizer.apply_chat_template(conversation, **options)
        except (jinja2.TemplateError, TypeError) as error:
            raise ValueError(f"the chat template rejected the messages: {error}") from None
        return {"prompt": text, "multi_modal_data": {k: v for k, v in media.items() if v}}

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        mine = set(request_ids)
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), disable=not use_tqdm, desc="generating") as bar:
            while len(finished) < len(request_ids):
                for output in self.engine.step():
                    if output.finished and output.request_id in mine:
                        finished[output.request_id] = output
                        bar.update()
        return [finished[i] for i in request_ids]


def _one_output(sequences: list[RequestOutput], prompt: str | None) -> RequestOutput:
    """A prompt's n sequences as one output (vLLM's): the first's id, each completion indexed."""
    completions = [dataclasses.replace(s.outputs[0], index=i) for i, s in enumerate(sequences)]
    return dataclasses.replace(sequences[0], outputs=completions, prompt=prompt)


def _prompt_text(prompt) -> str | None:
    """A prompt's text, as given (a string, or a dict's "prompt"); None for token ids."""
    text = prompt if isinstance(prompt, str) else prompt.get("prompt") if isinstance(prompt, dict) else None
    return text if isinstance(text, str) else None


def _per_prompt(params, count: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"{len(params)} sampling params for {count} prompts")
    return params
