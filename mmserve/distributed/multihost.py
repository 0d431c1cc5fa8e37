"""Joining the processes of one role, on one or several hosts, into one JAX runtime.

JAX's multi-controller runtime is the distributed engine: every process runs the same program on
its own devices and ``jax.distributed`` makes them one set of global devices, so a mesh (and the
model sharded over it) spans hosts. Only process 0 talks to the router; the others follow.

Where the cluster comes from, first match wins:

1. flags ``--coordinator-address HOST:PORT --num-processes N --process-id I``;
2. the same in the environment (``MMSERVE_COORDINATOR_ADDRESS``, ``MMSERVE_NUM_PROCESSES``,
   ``MMSERVE_PROCESS_ID``), which is how the Kubernetes manifests pass a LeaderWorkerSet's
   leader address, group size and worker index;
3. a multi-host TPU slice (``TPU_WORKER_HOSTNAMES`` names more than one host): JAX detects the
   coordinator and ranks itself;
4. otherwise one process, and nothing to initialise.

On CPU the cross-process collectives go over gloo (``jax_cpu_collectives_implementation``, the
default in jax 0.10), which is what the two-process test on loopback uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import socket
from collections.abc import Mapping

import jax

from mmserve.config_flags import add_config_flags, config_from_args

ENV_COORDINATOR = "MMSERVE_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MMSERVE_NUM_PROCESSES"
ENV_PROCESS_ID = "MMSERVE_PROCESS_ID"
DEFAULT_COORDINATOR_PORT = 8476


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The processes one role runs as; each field is a ``serve.py`` flag over an MMSERVE_* variable."""

    coordinator_address: str | None = None
    """HOST:PORT of process 0's coordinator (jax.distributed); needed with more than one process"""
    num_processes: int = 1
    """processes in this role, on one host or several"""
    process_id: int = 0
    """this process's rank; 0 is the leader, which serves the router and the transfer control plane"""

    def __post_init__(self):
        if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process id {self.process_id} out of range for {self.num_processes} processes")
        if self.num_processes > 1 and not self.coordinator_address:
            raise ValueError(f"{self.num_processes} processes need a coordinator address (HOST:PORT)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Cluster:
        return cls(
            coordinator_address=env.get(ENV_COORDINATOR) or None,
            num_processes=int(env.get(ENV_NUM_PROCESSES, 1)),
            process_id=int(env.get(ENV_PROCESS_ID, 0)),
        )


ENV = {"coordinator_address": ENV_COORDINATOR, "num_processes": ENV_NUM_PROCESSES, "process_id": ENV_PROCESS_ID}


def add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser, Cluster, "multi-host", prefix="cluster_", env=ENV)


def cluster_from_args(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> Cluster:
    """Flags override the environment, one field at a time."""
    return config_from_args(Cluster, args, prefix="cluster_", base=Cluster.from_env(env))


def on_multi_host_tpu(env: Mapping[str, str] = os.environ) -> bool:
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize(cluster: Cluster, env: Mapping[str, str] = os.environ) -> None:
    """Starts the multi-controller runtime if this role spans processes; call before any JAX use."""
    if cluster.num_processes > 1:
        jax.distributed.initialize(cluster.coordinator_address, cluster.num_processes, cluster.process_id,
                                   coordinator_bind_address=coordinator_bind_address(cluster.coordinator_address))
    elif on_multi_host_tpu(env):
        jax.distributed.initialize()


def coordinator_bind_address(coordinator_address: str | None) -> str | None:
    """Where process 0's coordinator listens: its own address when that names an IP (loopback
    included), since jax otherwise listens on every interface ([::]:port) and its coordination
    service takes anyone's calls; None (every interface) for a name, such as a Kubernetes
    service's, which a socket cannot bind."""
    if not coordinator_address:
        return None
    host = coordinator_address.rpartition(":")[0].strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return coordinator_address


def leader_host(cluster: Cluster, env: Mapping[str, str] = os.environ) -> str:
    """How the other processes of the role reach process 0: the coordinator's host, else the first
    TPU worker of the slice (worker 0 leads), else this host's address (only process 0 uses it)."""
    if cluster.coordinator_address:
        return cluster.coordinator_address.rsplit(":", 1)[0]
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    return hosts[0] if hosts else socket.gethostbyname(socket.gethostname())


def is_leader() -> bool:
    """The one process of a role that serves the router and the transfer control plane."""
    return jax.process_index() == 0
