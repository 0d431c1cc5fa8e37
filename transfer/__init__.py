"""Block buffers moved between disaggregated roles: embeddings encode -> prefill, KV prefill -> decode.

See docs/transfer.md. The package knows nothing of models: what moves is declared as fields.
"""

from transfer.allocator import Allocation, AllocationError, BlockAllocator
from transfer.block_buffers import BlockBuffers, Chunk, bucket_tokens
from transfer.bootstrap import BootstrapServer
from transfer.config import TransferConfig
from transfer.data_plane import DataPlane, DataPlaneError, open_data_plane
from transfer.fields import Field, field
from transfer.messages import TransferInfo, TransferMode
from transfer.poll import PollState
from transfer.receiver import Receiver
from transfer.receiver_room import Received
from transfer.sender import Sender

__all__ = [
    "Allocation", "AllocationError", "BlockAllocator", "BlockBuffers", "BootstrapServer", "Chunk", "DataPlane",
    "DataPlaneError", "Field", "PollState", "Received", "Receiver", "Sender", "TransferConfig", "TransferInfo",
    "TransferMode", "bucket_tokens", "field", "open_data_plane",
]
