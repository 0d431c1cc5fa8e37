"""Scale-out: device meshes, the logical-axis rules table, sharded layouts and multi-host start-up."""

from mmserve.distributed.layout import MeshLayout
from mmserve.distributed.mesh import AXES, MeshShape, make_mesh
from mmserve.distributed.rules import LOGICAL_AXIS_RULES, partition_spec

__all__ = ["AXES", "LOGICAL_AXIS_RULES", "MeshLayout", "MeshShape", "make_mesh", "partition_spec"]
