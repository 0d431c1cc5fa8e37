"""``serve.py --role all --workers``: how many workers of each role, parsed by serve.py's own parser,
and the names they register under."""

import pytest

from mmserve.roles.launch_all import worker_names
from mmserve.serving.cli import build_parser


def test_roles_not_named_get_one_worker_and_several_are_numbered():
    counts = build_parser().parse_args(["--workers", "prefill=2,decode=3"]).workers
    assert counts == {"encode": 1, "prefill": 2, "decode": 3}
    assert worker_names(counts) == [("encode", "encode"), ("prefill", "prefill-0"), ("prefill", "prefill-1"),
                                    ("decode", "decode-0"), ("decode", "decode-1"), ("decode", "decode-2")]
    assert build_parser().parse_args([]).workers == {"encode": 1, "prefill": 1, "decode": 1}


@pytest.mark.parametrize("value", ["prefill=0", "router=2", "prefill", "decode=two", "prefill=-1"])
def test_a_count_that_is_not_a_worker_role_and_a_positive_number_is_refused(value, capsys):
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args(["--workers", value])
    assert refused.value.code == 2 and "--workers" in capsys.readouterr().err


def test_role_all_puts_only_the_routers_http_port_where_host_says():
    """``--role all --host 0.0.0.0``: the registry and every worker's gRPC port listened on every
    interface too (token-checked, but not meant to be reachable)."""
    from mmserve.roles.launch_all import all_commands

    argv = ["--role", "all", "--host", "0.0.0.0", "--port", "8000", "--workers", "prefill=2"]
    commands = all_commands(build_parser().parse_args(argv), argv, "/run/sockets")
    parsed = {name: build_parser().parse_args(command[2:]) for name, command in commands.items()}
    assert parsed["router"].role == "router"
    assert (parsed["router"].host, parsed["router"].port) == ("0.0.0.0", 8000)
    assert parsed["router"].registry_host == "127.0.0.1"
    workers = {name: args for name, args in parsed.items() if name != "router"}
    assert sorted(workers) == ["decode", "encode", "prefill-0", "prefill-1"]
    assert {args.host for args in workers.values()} == {"127.0.0.1"}
    assert {args.router_url for args in workers.values()} == {"unix:/run/sockets/registry.sock"}
    assert {args.drain_timeout for args in workers.values()} == {0.0}  # stopped, the whole server stops at once
    assert parsed["router"].registry_socket == "/run/sockets/registry.sock"
    # the bootstrap registry too: on a loopback TCP port another local user could take it first
    assert parsed["router"].bootstrap_socket == "/run/sockets/bootstrap.sock"
    assert {args.bootstrap for args in workers.values()} == {"ipc:///run/sockets/bootstrap.sock"}
    assert {name: args.grpc_socket for name, args in workers.items()} == {
        name: f"/run/sockets/{name}.sock" for name in workers}
