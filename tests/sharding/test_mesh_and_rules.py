"""The --mesh flag, the rules table and the cluster flags, without devices."""

import argparse

import jax
import pytest
from jax.sharding import PartitionSpec as P

from mmserve.distributed import MeshLayout, MeshShape, make_mesh, partition_spec
from models.qwen3_vl_moe.partitioning import KV_CACHE_AXES
from mmserve.distributed.multihost import (Cluster, add_cluster_flags, cluster_from_args, coordinator_bind_address,
                                          leader_host)


def test_mesh_flag_parses_any_order_and_defaults_missing_axes_to_one():
    assert MeshShape.parse("expert=2,model=4") == MeshShape(data=1, model=4, expert=2)
    assert str(MeshShape.parse("model=8")) == "data=1,model=8,expert=1"
    assert MeshShape.parse("data=2,model=2,expert=2").num_devices == 8


@pytest.mark.parametrize("text", ["model=4,tensor=2", "model", "model=four", "model=0", "model=2,model=2"])
def test_bad_mesh_flag_is_a_clear_error(text):
    with pytest.raises(ValueError, match="mesh"):
        MeshShape.parse(text)


def test_mesh_larger_than_the_devices_names_both_counts():
    with pytest.raises(ValueError, match=rf"needs {jax.device_count() + 1} devices but {jax.device_count()}"):
        make_mesh(MeshShape(model=jax.device_count() + 1))


def test_split_only_when_even_and_whole_units():
    sizes = {"data": 1, "model": 4, "expert": 2}
    assert partition_spec(("embed", "heads"), (64, 128), sizes, {"heads": 16}) == P(None, "model")
    assert partition_spec(("embed", "kv_heads"), (64, 32), sizes, {"kv_heads": 16}) == P(None, None)
    assert partition_spec(("experts", "embed", "expert_mlp"), (8, 64, 48), sizes) == P("expert", None, "model")
    assert partition_spec(("batch", None), (1, 7), {"data": 2}) == P(None, None)


@pytest.mark.parametrize("model_ways, spec", [(4, P(None, None, "model", None)), (8, P(None, None, None, None))])
def test_arriving_kv_rows_split_their_heads_like_the_cache(model_ways, spec):
    """4 KV heads (the real config) split 4 ways and are replicated 8 ways, rows and pages alike."""
    mesh = jax.sharding.AbstractMesh((1, model_ways, 1), ("data", "model", "expert"))
    layout = MeshLayout(mesh)
    rows = layout.kv_rows((64, 48, 4, 128))
    pages = layout.sharding(KV_CACHE_AXES, (48, 100, 16, 4, 128))
    assert rows.spec == spec
    assert rows.spec[2] == pages.spec[3]


def test_unknown_logical_axis_is_an_error():
    with pytest.raises(KeyError, match="no rule"):
        partition_spec(("sideways",), (8,), {"model": 2})


def test_cluster_flags_override_environment():
    parser = argparse.ArgumentParser()
    add_cluster_flags(parser)
    env = {"MMSERVE_COORDINATOR_ADDRESS": "leader:8476", "MMSERVE_NUM_PROCESSES": "4", "MMSERVE_PROCESS_ID": "2"}
    assert cluster_from_args(parser.parse_args([]), env) == Cluster("leader:8476", 4, 2)
    assert cluster_from_args(parser.parse_args(["--process-id", "3"]), env).process_id == 3
    with pytest.raises(ValueError, match="coordinator"):
        Cluster(None, 2, 0)


def test_followers_reach_the_leader_at_the_coordinator_or_the_first_tpu_worker():
    assert leader_host(Cluster("10.0.0.5:8476", 2, 1), {}) == "10.0.0.5"
    assert leader_host(Cluster(), {"TPU_WORKER_HOSTNAMES": "t1v-w-0,t1v-w-1"}) == "t1v-w-0"
    assert leader_host(Cluster(), {})  # this host's own address, which only a leader publishes


def test_the_coordinator_listens_on_its_own_address_when_that_is_an_ip():
    """jax.distributed's coordinator listened on every interface ([::]:port) even for a loopback
    address; a name (a Kubernetes service) cannot be bound, so it keeps every interface."""
    assert coordinator_bind_address("127.0.0.1:8476") == "127.0.0.1:8476"
    assert coordinator_bind_address("10.0.0.5:8476") == "10.0.0.5:8476"
    assert coordinator_bind_address("[::1]:8476") == "[::1]:8476"
    assert coordinator_bind_address("mmserve-prefill-0.mmserve:8476") is None
    assert coordinator_bind_address(None) is None
