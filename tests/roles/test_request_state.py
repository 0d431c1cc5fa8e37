"""Each role's request states: only the listed transitions are legal, every live state can fail,
and a request leaves its role's table only through finish, which releases it exactly once with
the state it was in (what it held)."""

import dataclasses
import json
import logging
import subprocess
import sys

import pytest

from mmserve.roles.request_state import (DECODE_TRANSITIONS, ENCODE_TRANSITIONS, PREFILL_TRANSITIONS, DecodeState,
                                         IllegalTransition, PrefillState, RequestTable, RoleRequest)

TABLES = {"prefill": PREFILL_TRANSITIONS, "decode": DECODE_TRANSITIONS, "encode": ENCODE_TRANSITIONS}


@dataclasses.dataclass(eq=False, kw_only=True)
class Decoding(RoleRequest[DecodeState]):
    TRANSITIONS = DECODE_TRANSITIONS
    INITIAL = frozenset({DecodeState.RESERVING})


@dataclasses.dataclass(eq=False, kw_only=True)
class Prefilling(RoleRequest[PrefillState]):
    TRANSITIONS = PREFILL_TRANSITIONS
    INITIAL = frozenset({PrefillState.WAITING_FOR_EMBEDDINGS, PrefillState.PREFILLING})


def decoding(request_id: str = "r", room: int = 1) -> Decoding:
    return Decoding(request_id=request_id, room=room, state=DecodeState.RESERVING)


@pytest.fixture
def released():
    return []


@pytest.fixture
def table(released):
    return RequestTable(lambda record, was: released.append((record.request_id, was, record.state)))


@pytest.mark.parametrize("role", TABLES)
def test_every_live_state_can_fail_and_the_ends_lead_nowhere(role):
    transitions = TABLES[role]
    states = set(transitions)
    ends = {s for s, to in transitions.items() if not to}
    assert {s.name for s in ends} == {"DONE", "FAILED"}
    for state, to in transitions.items():
        assert to <= states
        if state not in ends:
            assert any(s.name == "FAILED" for s in to), state


def test_legal_path_and_illegal_moves_refused_and_logged(caplog):
    record = decoding()
    record.move(DecodeState.RECEIVING_KV)
    with caplog.at_level(logging.ERROR), pytest.raises(IllegalTransition, match="RECEIVING_KV -> RESERVING"):
        record.move(DecodeState.RESERVING)
    assert "illegal transition RECEIVING_KV -> RESERVING" in caplog.text
    assert record.state is DecodeState.RECEIVING_KV
    with pytest.raises(IllegalTransition):
        record.move(DecodeState.DONE)  # KV never arrived: it cannot be done
    record.move(DecodeState.DECODING)
    record.move(DecodeState.DONE)
    assert record.finished
    for state in DecodeState:
        with pytest.raises(IllegalTransition):
            record.move(state)


def test_a_request_enters_only_in_an_initial_state():
    with pytest.raises(IllegalTransition):
        Decoding(request_id="r", room=1, state=DecodeState.DECODING)
    Prefilling(request_id="text", room=1, state=PrefillState.PREFILLING)  # text-only: no embeddings to wait for


def test_a_state_machine_with_a_live_state_that_cannot_fail_is_refused():
    with pytest.raises(TypeError, match="no way to FAILED"):
        class Stuck(RoleRequest[DecodeState]):
            TRANSITIONS = {**DECODE_TRANSITIONS, DecodeState.DECODING: frozenset({DecodeState.DONE})}
            INITIAL = frozenset({DecodeState.RESERVING})


def test_finish_releases_once_with_the_state_it_held(table, released):
    record = table.add(decoding())
    record.move(DecodeState.RECEIVING_KV)
    assert table.finish("r", DecodeState.FAILED, "KV transfer failed")
    assert released == [("r", DecodeState.RECEIVING_KV, DecodeState.FAILED)]
    assert record.reason == "KV transfer failed" and "r" not in table and len(table) == 0
    assert not table.finish("r", DecodeState.FAILED, "aborted")  # an abort after the end: nothing to do
    assert not table.finish("never-seen", DecodeState.FAILED)
    assert len(released) == 1


def test_an_illegal_end_is_refused_and_the_request_keeps_what_it_holds(table, released):
    table.add(decoding())
    with pytest.raises(IllegalTransition):
        table.finish("r", DecodeState.DONE)  # still reserving: it cannot have finished
    with pytest.raises(IllegalTransition, match="not an end"):
        table.finish("r", DecodeState.RECEIVING_KV)  # finish only ends a request
    assert table["r"].state is DecodeState.RESERVING and released == []
    table.finish("r", DecodeState.FAILED)
    assert released == [("r", DecodeState.RESERVING, DecodeState.FAILED)]


def test_a_request_id_or_room_already_held_is_refused(table):
    table.add(decoding("a", room=1))
    with pytest.raises(ValueError, match="request id"):
        table.add(decoding("a", room=2))
    with pytest.raises(ValueError, match="room 1"):
        table.add(decoding("b", room=1))
    table.finish("a", DecodeState.FAILED)
    table.add(decoding("a", room=1))  # free again once finished


def test_states_counts_and_iteration_in_arrival_order_survive_finishing(table):
    for i in range(4):
        table.add(decoding(f"r{i}", room=i))
    table["r1"].move(DecodeState.RECEIVING_KV)
    assert [r.request_id for r in table.in_state(DecodeState.RESERVING)] == ["r0", "r2", "r3"]
    assert table.counts() == {"reserving": 3, "receiving_kv": 1}
    for record in table:
        table.finish(record.request_id, DecodeState.FAILED)
    assert len(table) == 0 and table.counts() == {}


def test_a_transfer_is_a_span_of_its_own_under_the_roles_span(tmp_path):
    """A hop state (a transfer) gets a child span from entering it to leaving it, also when the
    request starts in it, and the receiving side's span links to the sending side's (whose context
    the transfer's message carries); in a process whose tracing is on, as a role runs it."""
    script = f"""
import dataclasses
from pathlib import Path
from mmserve.roles.request_state import (DECODE_TRANSITIONS, PREFILL_TRANSITIONS, DecodeState, PrefillState,
                                         RequestTable, RoleRequest)
from mmserve.tracing import TracingConfig, configure_tracing, role_span, shutdown_tracing

@dataclasses.dataclass(eq=False, kw_only=True)
class Prefilling(RoleRequest[PrefillState]):
    TRANSITIONS = PREFILL_TRANSITIONS
    INITIAL = frozenset({{PrefillState.WAITING_FOR_EMBEDDINGS, PrefillState.PREFILLING}})
    HOPS = {{PrefillState.WAITING_FOR_EMBEDDINGS: "receive embeddings", PrefillState.SENDING_KV: "send KV"}}

@dataclasses.dataclass(eq=False, kw_only=True)
class Decoding(RoleRequest[DecodeState]):
    TRANSITIONS = DECODE_TRANSITIONS
    INITIAL = frozenset({{DecodeState.RESERVING}})
    HOPS = {{DecodeState.RECEIVING_KV: "receive KV"}}

configure_tracing(TracingConfig(trace_file=Path({str(tmp_path / "spans.jsonl")!r})), "mmserve-prefill")
table = RequestTable(lambda record, was: None)
record = table.add(Prefilling(request_id="r", room=7, state=PrefillState.WAITING_FOR_EMBEDDINGS,
                              span=role_span("prefill", "r", None)))
record.move(PrefillState.PREFILLING)
record.move(PrefillState.SENDING_KV)
carrier = record.hop_carrier()  # what the KV's TransferInfo carries
receiving = table.add(Decoding(request_id="d", room=8, state=DecodeState.RESERVING, span=role_span("decode", "d", None)))
receiving.move(DecodeState.RECEIVING_KV)
receiving.link_hop(carrier)
receiving.move(DecodeState.DECODING)
table.finish("d", DecodeState.DONE)
table.finish("r", PrefillState.DONE)
shutdown_tracing()
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    spans = {s["name"]: s for s in map(json.loads, (tmp_path / "spans.jsonl").read_text().splitlines())}
    assert set(spans) == {"prefill", "receive embeddings", "send KV", "decode", "receive KV"}
    assert [link["context"]["span_id"] for link in spans["receive KV"]["links"]] == [
        spans["send KV"]["context"]["span_id"]]  # the receiving side points at the sending side
    role = spans["prefill"]
    for hop in ("receive embeddings", "send KV"):
        assert spans[hop]["parent_id"] == role["context"]["span_id"]
        assert spans[hop]["context"]["trace_id"] == role["context"]["trace_id"]
        assert spans[hop]["attributes"]["mmserve.room"] == "7"
    assert spans["receive embeddings"]["end_time"] <= spans["send KV"]["start_time"] <= role["end_time"]
