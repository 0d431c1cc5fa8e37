"""serve.py's command line: every flag documented with its default, the config flags generated
from the configs' fields, a bad setting or a missing cluster secret refused before loading."""

import argparse
import dataclasses
import os
import subprocess
import sys

import pytest

from mmserve.cluster_credential import SECRET_ENV, SECRET_FILE_ENV
from mmserve.config_flags import field_docs, flag_name
from mmserve.distributed.multihost import Cluster
from mmserve.engine.config import EngineConfig
from mmserve.serving.cli import ROUTER_FIXED, build_parser, engine_config, router_settings
from mmserve.serving.router.settings import RouterSettings
from server_process import REPO, SERVE, free_port
from transfer.config import SECRET_FIELDS, TransferConfig

CONFIGS = ((EngineConfig, ()), (RouterSettings, ROUTER_FIXED), (TransferConfig, SECRET_FIELDS), (Cluster, ()))

FLAGS = ("--role", "--model", "--dtype", "--host", "--port", "--api-key-file", "--page-size", "--num-pages",
         "--kv-cache-bytes", "--max-model-len", "--max-num-seqs", "--max-prefill-tokens", "--max-body-bytes",
         "--request-read-timeout", "--max-image-pixels", "--max-images-per-request")


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SERVE), *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_help_documents_every_flag():
    result = _serve("--help")
    assert result.returncode == 0
    for flag in FLAGS:
        assert flag in result.stdout, flag
    for role in ("encode", "prefill", "decode", "router", "colocated", "all"):
        assert role in result.stdout


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in parser._actions for option in action.option_strings}


def test_every_flag_has_a_description_and_says_its_default():
    parser = build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.option_strings == ["-h", "--help"]:
            continue
        assert action.help and len(action.help) > 15, action.option_strings
        text = formatter._get_help_string(action) % {"default": action.default}
        assert "(default" in text or "default:" in text or action.default in (None, False), action.option_strings


@pytest.mark.parametrize("config, fixed", CONFIGS, ids=lambda c: getattr(c, "__name__", ""))
def test_each_config_field_is_a_flag_with_its_docstring_and_default(config, fixed):
    options = _options(build_parser())
    docs = field_docs(config)
    for field in dataclasses.fields(config):
        if field.name in fixed:
            assert flag_name(field.name) not in options or field.name == "max_model_len", field.name
            continue
        action = options[flag_name(field.name)]
        assert action.help.startswith(docs[field.name][:40].replace("%", "%%")), field.name
        shown = "none" if field.default is None else repr(field.default) if isinstance(field.default, str) \
            else str(field.default)
        assert f"default: {shown}" in action.help or "(default" in docs[field.name], field.name


def test_flags_that_are_not_given_leave_the_configs_defaults():
    args = build_parser().parse_args(["--page-size", "32", "--no-precompile", "--request-timeout", "0"])
    assert engine_config(args) == EngineConfig(page_size=32, precompile=False)
    settings = router_settings(args, 2048)
    assert settings.request_timeout_s == 0 and settings.max_body_bytes == RouterSettings("m", 1).max_body_bytes
    assert settings.model_name == "tiny"


def test_the_reasoning_parser_flag_reaches_the_router():
    args = build_parser().parse_args(["--role", "router", "--reasoning-parser", "qwen3"])
    assert router_settings(args, 2048).reasoning_parser == "qwen3"


def test_bad_engine_setting_is_refused_with_the_reason():
    result = _serve("--role", "colocated", "--page-size", "0")
    assert result.returncode == 2
    assert "--page-size must be >= 1" in result.stderr  # the flag, not the config field


def test_bad_door_limit_is_refused_with_the_reason():
    result = _serve("--role", "colocated", "--max-body-bytes", "0")
    assert result.returncode == 2
    assert "--max-body-bytes must be >= 1" in result.stderr


def test_a_worker_without_the_cluster_secret_refuses_to_start():
    """Before loading anything: it could not prove itself to the router anyway."""
    env = {k: v for k, v in os.environ.items() if k not in (SECRET_ENV, SECRET_FILE_ENV)}
    result = subprocess.run([sys.executable, str(SERVE), "--role", "prefill", "--router-url", "127.0.0.1:1",
                             "--bootstrap", "tcp://127.0.0.1:2"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 2
    assert "no cluster secret" in result.stderr and SECRET_ENV in result.stderr


@pytest.mark.parametrize("flags, reason", [
    # each went on to a traceback deep in the start, a wrong port, or a server with no API key
    (["--dtype", "int8"], "invalid choice: 'int8'"),
    (["--port", "70000"], "a port is 0 to 65535, got 70000"),  # it listened on 70000 - 65536
    (["--mesh", "model=3x"], "bad size '3x'"),
    (["--mesh", "data=2,model=2"], "the data axis does not split a role's batch yet"),
    (["--num-processes", "2"], "need a coordinator address"),
    (["--heartbeat-interval", "20"], "heartbeat_timeout_s must exceed heartbeat_interval_s"),
    (["--request-timeout", "nan"], "--request-timeout must be >= 0 and finite"),
    (["--api-key-file", "/nonexistent/key"], "No such file or directory"),
    (["--api-key-file", "EMPTY"], "is empty"),  # read as no key, it turned authentication off
    # both were taken: a drain that never waited, a media directory every request was refused under
    (["--drain-timeout", "-1"], "seconds are 0 or more and finite, got -1"),
    (["--allowed-local-media-path", "/nonexistent/media"], "--allowed-local-media-path /nonexistent/media is not a "
                                                           "directory"),
    (["--reasoning-parser", "deepseek"], "--reasoning-parser must be one of qwen3, got 'deepseek'"),
])
def test_a_bad_start_up_flag_is_one_line_and_status_2(flags, reason, tmp_path, capsys):
    from mmserve.serving.cli import main

    empty = tmp_path / "key"
    empty.write_text("  \n")
    with pytest.raises(SystemExit) as stopped:
        main(["--role", "colocated", *[str(empty) if f == "EMPTY" else f for f in flags]])
    assert stopped.value.code == 2
    assert reason in capsys.readouterr().err


def test_a_model_that_cannot_load_is_one_line_naming_it():
    from mmserve.roles.launch import model_errors_said
    from models.qwen3_vl_moe import load_model

    with pytest.raises(SystemExit, match=r"cannot load the model '/nonexistent': /nonexistent: no config\.json"):
        with model_errors_said("/nonexistent"):
            load_model("/nonexistent")


@pytest.mark.parametrize("role", ["colocated", "all"])
def test_a_context_past_the_models_positions_is_one_line_before_anything_starts(role, monkeypatch):
    """As vLLM refuses it: tiny's max_position_embeddings is 4096; `--role all` says so before it
    starts a child (each would fail on it and be restarted)."""
    from mmserve.serving.cli import main

    monkeypatch.setenv("MMSERVE_CLUSTER_SECRET", "cli-test-secret-0123456789abcdef")
    with pytest.raises(SystemExit, match="max_model_len 8192 exceeds the model's max_position_embeddings 4096"):
        main(["--role", role, "--model", "tiny", "--port", "0", "--max-model-len", "8192"])


@pytest.fixture
def taken_port():
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.fixture
def taken_socket(tmp_path):
    """A Unix socket a live server listens on (ZMQ and gRPC bind over its file without a word)."""
    import socket

    path = str(tmp_path / "taken.sock")
    with socket.socket(socket.AF_UNIX) as holder:
        holder.bind(path)
        holder.listen()
        yield path


@pytest.mark.parametrize("flags, reason", [
    (["--role", "colocated", "--port", "{taken}"], "--port {taken} on 127.0.0.1 is not free"),
    (["--role", "router", "--port", "{free}", "--registry-socket", "{socket}"],
     "--registry-socket {socket} is not free"),
    (["--role", "router", "--port", "{free}", "--registry-port", "{free}", "--bootstrap-socket", "{socket}"],
     "cannot listen on --bootstrap-socket {socket}: another server is listening"),
    (["--role", "all", "--port", "{taken}"], "--port {taken} on 127.0.0.1 is not free"),
    (["--role", "router", "--port", "{free}", "--registry-port", "{taken}"], "--registry-port {taken} on"),
    (["--role", "router", "--port", "{free}", "--registry-port", "{free}", "--bootstrap-port", "{taken}"],
     "the transfer bootstrap registry cannot listen on --bootstrap-port {taken}"),
    (["--role", "encode", "--port", "{taken}", "--router-url", "127.0.0.1:9", "--bootstrap", "tcp://127.0.0.1:9"],
     "--port {taken} on 127.0.0.1 is not free"),
    (["--role", "encode", "--grpc-socket", "{socket}", "--router-url", "127.0.0.1:9",
      "--bootstrap", "tcp://127.0.0.1:9"], "--grpc-socket {socket} is not free"),
    (["--role", "colocated", "--port", "{free}", "--mesh", "model=64"], "--mesh model=64: mesh"),
])
def test_a_port_taken_or_a_mesh_too_large_is_one_line_before_anything_loads(flags, reason, taken_port, taken_socket,
                                                                           monkeypatch):
    """Said before minutes of loading and compiling (an HTTP port was found taken only after the
    engine compiled; `--role all` restarted its router five times on it), and in one line."""
    from mmserve.serving.cli import main

    monkeypatch.setenv(SECRET_ENV, "cli-test-secret-0123456789abcdef")
    values = {"taken": taken_port, "free": free_port(), "socket": taken_socket}
    with pytest.raises(SystemExit, match=reason.format(**values)):
        main([*(f.format(**values) for f in flags), "--model", "tiny"])


def test_a_checkpoint_without_its_tokenizer_is_one_line_naming_the_file(tmp_path):
    import json

    from mmserve.roles.launch import model_errors_said
    from models.qwen3_vl_moe import load_model

    (tmp_path / "config.json").write_text(json.dumps(load_model("tiny", weights=False).config.to_hf()))
    with pytest.raises(SystemExit, match=f"{tmp_path}: no tokenizer.json"):
        with model_errors_said(str(tmp_path)):
            load_model(tmp_path)


def test_ctrl_c_while_starting_is_status_130_and_no_traceback(tmp_path):
    """Ctrl-C while the engine compiles (minutes on a CPU) used to end in a KeyboardInterrupt traceback."""
    import signal
    import time

    log = tmp_path / "serve.log"
    launcher = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                f"sys.argv = {[str(SERVE), '--role', 'colocated', '--model', 'tiny', '--port', str(free_port()), '--compilation-cache', '']!r}; "
                "runpy.run_path(sys.argv[0], run_name='__main__')")
    env = os.environ | {SECRET_ENV: "cli-test-secret-0123456789abcdef"}
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-c", launcher], stdout=out, stderr=subprocess.STDOUT, env=env,
                                  cwd=REPO)
    deadline = time.monotonic() + 120
    while "weights loaded" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)  # compiling now
    server.send_signal(signal.SIGINT)
    assert server.wait(timeout=60) == 130
    assert "Traceback" not in log.read_text(), log.read_text()


def test_a_router_stopped_by_sigterm_ends_through_its_finally_blocks(tmp_path):
    """It died of the signal (status 143; the HTTP server re-raises it once shut down), so nothing
    registered to run at exit ran: the trace's last spans, batched, were never written."""
    import signal
    import time

    from server_process import request

    port = free_port()
    env = os.environ | {SECRET_ENV: "cli-test-secret-0123456789abcdef"}
    with open(tmp_path / "router.log", "w") as out:
        router = subprocess.Popen([sys.executable, str(SERVE), "--role", "router", "--model", "tiny", "--port", str(port),
                                   "--registry-port", str(free_port()), "--bootstrap-port", str(free_port()),
                                   "--trace-file", str(tmp_path / "spans.jsonl")],
                                  stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert router.poll() is None and time.monotonic() < deadline, (tmp_path / "router.log").read_text()
            try:
                if request("GET", f"http://127.0.0.1:{port}/metrics", timeout=5)[0] == 200:
                    break
            except OSError:
                time.sleep(0.3)
        router.send_signal(signal.SIGTERM)
        assert router.wait(timeout=60) == 0, (tmp_path / "router.log").read_text()
    finally:
        router.kill()
