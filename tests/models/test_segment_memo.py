"""A chat's later turns are tokenized stretch by stretch, the earlier turns' stretches remembered:
the ids equal the whole text's tokenization, for the tiny template and Qwen3-VL's own, and a
tokenizer where that would not hold (an added token that strips whitespace, a post-processor that
adds a BOS id, a pre-tokenizer that treats the first word apart) is tokenized whole."""

import random
import threading
from pathlib import Path

import pytest
from tokenizers import AddedToken, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

from models.qwen3_vl_moe.segment_memo import MIN_STRETCH_CHARS, SegmentMemo
from models.qwen3_vl_moe.tokenizer import Tokenizer
from models.qwen3_vl_moe.tiny_tokenizer import TINY_CORPUS, build_tiny_tokenizer

QWEN3_VL_TEMPLATE = (Path(__file__).resolve().parents[1] / "qwen3_vl_chat_template.jinja").read_text()
WORDS = TINY_CORPUS.split() + ["é", "你好", "🙂", "<tool_call>", "x_y", "\n\n", "  "]


def conversation(rng: random.Random, turns: int) -> list[dict]:
    def text():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
    messages = [{"role": "system", "content": text()}]
    for _ in range(turns):
        content = text() if rng.random() < 0.5 else [{"type": "image"}, {"type": "text", "text": text()}]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": text()}]
    return messages


@pytest.mark.parametrize("template", ["tiny", "qwen3_vl"])
def test_every_turn_of_a_chat_equals_its_whole_tokenization_and_later_turns_reuse_the_earlier(template):
    tiny = build_tiny_tokenizer()
    tokenizer = tiny if template == "tiny" else Tokenizer(tiny.backend, QWEN3_VL_TEMPLATE, tiny.config)
    assert tokenizer._memo.usable
    rng = random.Random(3)
    for chat in range(8):
        messages = conversation(rng, 5)
        hits = tokenizer._memo.hits
        for turn in range(1, 6):
            text = tokenizer.apply_chat_template(messages[:2 * turn])
            assert tokenizer.encode(text) == tokenizer.backend.encode(text).ids, (chat, turn)
        assert tokenizer._memo.hits > hits  # turns 2-5 found the earlier turns' stretches


def _with_rstrip_token(tokenizer: Tokenizer) -> None:
    tokenizer.backend.add_special_tokens([AddedToken("<|sep|>", special=True, normalized=False, rstrip=True)])


def _with_bos(tokenizer: Tokenizer) -> None:
    tokenizer.backend.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 1000)])


def metaspace_first() -> Tokenizer:
    """A sentencepiece-like tokenizer that marks only the text's first word as a word start."""
    backend = BackendTokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.train_from_iterator(TINY_CORPUS.splitlines(), trainers.BpeTrainer(vocab_size=300, show_progress=False))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<|im_start|>", "<|im_end|>", "<|sep|>")])
    return Tokenizer(backend, "")


def tiny_with(change) -> Tokenizer:
    tiny = build_tiny_tokenizer()
    change(tiny)
    return Tokenizer(tiny.backend, tiny.chat_template, tiny.config)


@pytest.mark.parametrize("make", [lambda: tiny_with(_with_rstrip_token), lambda: tiny_with(_with_bos), metaspace_first],
                         ids=["rstrip_token", "bos", "metaspace_first"])
def test_a_tokenizer_where_stretches_do_not_add_up_is_tokenized_whole(make):
    tokenizer = make()
    assert not tokenizer._memo.usable
    text = "<|im_start|>user\n" + " ".join(WORDS[:40]) + "<|sep|>  tail<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.encode(text) == tokenizer.backend.encode(text).ids


def test_the_memo_keeps_within_its_budget_dropping_the_least_recently_used():
    backend = build_tiny_tokenizer().backend
    memo = SegmentMemo(backend, budget_bytes=4096)
    stretches = [f"{i} " + " ".join(WORDS[i:i + 30]) for i in range(40)]
    for stretch in stretches:
        assert len(stretch) >= MIN_STRETCH_CHARS
        memo.put(stretch, backend.encode(stretch, add_special_tokens=False).ids)
        memo.get(stretches[0])  # kept in use: never the least recent
    assert memo._bytes <= 4096
    assert memo.get(stretches[0]) is not None and memo.get(stretches[1]) is None
    assert memo.get(stretches[-1]) == backend.encode(stretches[-1], add_special_tokens=False).ids


def test_threads_encoding_chats_at_once_get_the_whole_texts_ids():
    tokenizer = build_tiny_tokenizer()
    rng = random.Random(5)
    texts = [tokenizer.apply_chat_template(conversation(rng, 3)) for _ in range(12)]
    expected = [tokenizer.backend.encode(t).ids for t in texts]
    failures = []

    def work(seed):
        order = random.Random(seed).sample(range(len(texts)), len(texts))
        for i in order * 3:
            if tokenizer.encode(texts[i]) != expected[i]:
                failures.append(i)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
