"""Lazy checkpoint I/O: open from headers, read tensors on demand, write shards atomically."""

from .checkpoint import Checkpoint, SafetensorsCheckpoint, TorchBinCheckpoint
from .device import resolve_device
from .errors import Cancelled, CheckpointError, MergescopeError
from .lora import LoraAdapter, LoraCheckpoint
from .model_files import ModelConfig
from .naming import group_order_key, group_tensors, layer_group, layer_index, natural_key
from .resolve import open_checkpoint
from .safetensors_format import TensorInfo, read_header
from .tensor_spec import TensorSpec
from .writer import CheckpointWriter, check_output_folder, save_checkpoint

__all__ = [
    "Cancelled",
    "Checkpoint",
    "CheckpointError",
    "CheckpointWriter",
    "LoraAdapter",
    "LoraCheckpoint",
    "MergescopeError",
    "ModelConfig",
    "SafetensorsCheckpoint",
    "TensorInfo",
    "TensorSpec",
    "TorchBinCheckpoint",
    "check_output_folder",
    "group_order_key",
    "group_tensors",
    "layer_group",
    "layer_index",
    "natural_key",
    "open_checkpoint",
    "read_header",
    "resolve_device",
    "save_checkpoint",
]
