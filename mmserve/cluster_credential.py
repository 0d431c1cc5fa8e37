"""The cluster credential: one secret every process of a deployment holds, and nothing else does.

A worker is a worker because it proves it holds this secret, not because it registered. From it
each control surface derives its own key (so no surface ever sends the secret itself):

- gRPC between the router and the workers: a bearer token checked by a server interceptor;
- every ZMQ control surface between the processes (transfer control and its bootstrap registry,
  KV events, a multi-host role's lockstep channel): CurveZMQ key pairs (``transfer.curve``).

Where it comes from, first match wins: ``--cluster-secret-file PATH`` (a mounted Kubernetes
Secret), ``$MMSERVE_CLUSTER_SECRET_FILE``, ``$MMSERVE_CLUSTER_SECRET``. Never the command line
(every local user can read a process's argv) and never a log line. ``serve.py --role all``
generates one per run and hands it to its children in their environment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from transfer.curve import CurveKeys

SECRET_ENV = "MMSERVE_CLUSTER_SECRET"
SECRET_FILE_ENV = "MMSERVE_CLUSTER_SECRET_FILE"
MIN_SECRET_BYTES = 16


class MissingCredential(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True, repr=False)
class ClusterCredential:
    secret: bytes

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the cluster secret must have at least {MIN_SECRET_BYTES} bytes")

    def __repr__(self) -> str:
        return "ClusterCredential(<hidden>)"

    def key(self, purpose: str) -> bytes:
        """A key for one surface, derived so that none reveals the secret or another's key."""
        return hmac.new(self.secret, purpose.encode(), hashlib.sha256).digest()

    @property
    def grpc_token(self) -> str:
        return self.key("grpc").hex()

    @property
    def kv_event_keys(self) -> CurveKeys:
        """The CurveZMQ key pairs of the KV event sockets (publisher, and the one subscriber key it
        admits)."""
        return CurveKeys.from_secret(self.secret, "kv-events")

    @property
    def lockstep_keys(self) -> CurveKeys:
        """The CurveZMQ key pairs of a multi-host role's lockstep channel (leader, followers)."""
        return CurveKeys.from_secret(self.secret, "lockstep")

    @property
    def transfer_key(self) -> str:
        """The transfer layer's secret (TransferConfig.secret), from which it derives the CurveZMQ
        keys of its control and registry sockets."""
        return self.key("transfer").hex()

    @classmethod
    def generate(cls) -> ClusterCredential:
        return cls(secrets.token_hex(32).encode())

    @classmethod
    def load(cls, path: str | Path | None = None, env: Mapping[str, str] | None = None) -> ClusterCredential:
        """From ``path``, else the environment; a clear error when there is none."""
        env = os.environ if env is None else env
        path = path or env.get(SECRET_FILE_ENV)
        if path:
            _check_private(Path(path))
            secret = Path(path).read_bytes().strip()
        elif env.get(SECRET_ENV):
            # stripped as a file's is: a Kubernetes Secret made from a file ending in a newline is
            # the same secret read as a variable in one pod and as a mounted file in another
            secret = env[SECRET_ENV].encode().strip()
        else:
            raise MissingCredential(
                f"no cluster secret: give --cluster-secret-file, ${SECRET_FILE_ENV} or ${SECRET_ENV} (the same on "
                f"every process of the deployment; `openssl rand -hex 32` makes one)")
        return cls(secret)

    def environment(self) -> dict[str, str]:
        """What a child process needs in its environment to hold this credential."""
        return {SECRET_ENV: self.secret.decode()}


def _check_private(path: Path) -> None:
    """A secret file others can read is no secret (ssh refuses its keys so, for the same reason)."""
    mode = path.stat().st_mode
    if mode & 0o077:
        raise PermissionError(f"{path}: the cluster secret file is readable by others (mode {mode & 0o777:o}); "
                              f"`chmod 600 {path}`")
