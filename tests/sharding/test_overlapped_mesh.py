"""Overlapped decode steps on a mesh: a step dispatched on the last sample's ids, still on the
mesh's devices, gives what steps run in turn give (themselves held to one device by
``test_sharded_model.py`` and ``test_multihost.py``), and placing those ids compiles nothing after
ready. Roles spanning two processes overlap too: ``tests/roles/test_multihost.py``."""

import pytest

from multidevice import run_worker

MESH = "data=1,model=4,expert=2"


@pytest.mark.slow
def test_overlapped_steps_on_a_mesh_equal_steps_in_turn_and_compile_nothing_after_ready(shardable_checkpoint):
    report = run_worker("overlapped_mesh_worker.py", shardable_checkpoint, MESH, devices=8, timeout=600)
    in_turn, overlapped = report["in_turn"], report["overlapped"]
    assert overlapped["answers"] == in_turn["answers"]
    assert [len(a) for a in overlapped["answers"]] == [20, 16, 12, 5]
    assert in_turn["overlapped_steps"] == 0
    assert overlapped["overlapped_steps"] >= 10  # every step of the batch of four after its first, and more
    assert overlapped["compiles_after_ready"] == 0 and in_turn["compiles_after_ready"] == 0
    assert overlapped["free_pages"] == in_turn["free_pages"] == 63  # page 0 is scratch
