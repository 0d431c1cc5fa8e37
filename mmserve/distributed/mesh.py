"""The device mesh of a role: ``--mesh data=1,model=4,expert=2`` -> a ``jax.sharding.Mesh``.

Three named axes, always in this order: ``data`` (replicas over the batch), ``model`` (tensor
parallel: attention heads and MLP columns) and ``expert`` (expert parallel). An axis left out of
the flag has size 1, so ``--mesh model=8`` is a complete shape.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh

AXES = ("data", "model", "expert")


@dataclasses.dataclass(frozen=True)
class MeshShape:
    data: int = 1
    model: int = 1
    expert: int = 1

    def __post_init__(self):
        for axis, size in self.sizes.items():
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"mesh axis {axis} must be a positive integer, got {size!r}")

    @property
    def sizes(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in AXES}

    @property
    def num_devices(self) -> int:
        return math.prod(self.sizes.values())

    @classmethod
    def parse(cls, text: str) -> MeshShape:
        """``"data=1,model=4,expert=2"`` (any order, any subset) -> MeshShape."""
        sizes: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            axis, sep, value = item.partition("=")
            axis = axis.strip()
            if not sep or axis not in AXES:
                raise ValueError(f"bad mesh item {item!r} in {text!r}: expected AXIS=SIZE with AXIS in {AXES}")
            if axis in sizes:
                raise ValueError(f"mesh axis {axis} given twice in {text!r}")
            try:
                sizes[axis] = int(value)
            except ValueError:
                raise ValueError(f"bad size {value.strip()!r} for mesh axis {axis} in {text!r}") from None
        return cls(**sizes)

    def __str__(self) -> str:
        return ",".join(f"{axis}={size}" for axis, size in self.sizes.items())

    def abstract(self) -> AbstractMesh:
        """The mesh without devices: enough to compute shard shapes for any slice size."""
        return AbstractMesh(tuple(self.sizes.values()), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def make_mesh(shape: MeshShape | str, devices=None) -> Mesh:
    """A mesh over ``devices`` (default: all devices of all processes), whose count must match.

    ``jax.make_mesh`` orders devices by the physical topology on TPU, so the ``model`` axis (the
    most talkative) lands on neighbouring chips.
    """
    if isinstance(shape, str):
        shape = MeshShape.parse(shape)
    devices = jax.devices() if devices is None else list(devices)
    if shape.num_devices != len(devices):
        raise ValueError(
            f"mesh {shape} needs {shape.num_devices} devices but {len(devices)} are available "
            f"({jax.process_count()} process(es), {jax.local_device_count()} local devices each)"
        )
    return jax.make_mesh(
        tuple(shape.sizes.values()), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices
    )
