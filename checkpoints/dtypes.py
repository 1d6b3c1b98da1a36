"""The safetensors dtype names and their sizes, and their torch counterparts.

The header layer works with the safetensors names (``"BF16"``) so that reading headers never imports
torch; :func:`torch_dtype` maps a name to a ``torch.dtype`` when tensor data is actually needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import MergescopeError

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)
if TYPE_CHECKING:  # pragma: no cover
    import torch

#: bytes per element of every dtype mergescope can read
ITEMSIZE: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

FLOAT_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"})

_TORCH_NAMES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
}

#: spellings users write in plans and on the command line
_ALIASES = {
    "float32": "F32", "fp32": "F32", "float": "F32",
    "float16": "F16", "fp16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
    "float64": "F64", "fp64": "F64", "double": "F64",
}


def torch_dtype(name: str) -> torch.dtype:
    """The ``torch.dtype`` for a safetensors dtype name such as ``"BF16"``."""
    import torch

    return getattr(torch, _TORCH_NAMES[name])


def dtype_name(dtype: torch.dtype | str) -> str:
    """The safetensors name of a ``torch.dtype`` or of a user spelling (``bfloat16``, ``fp16``, ``F32``)."""
    if isinstance(dtype, str):
        if dtype in ITEMSIZE:
            return dtype
        try:
            return _ALIASES[dtype.lower()]
        except KeyError:
            raise MergescopeError(
                f"unknown dtype {dtype!r}: use one of {', '.join(sorted(_ALIASES))}"
            ) from None
    text = str(dtype).removeprefix("torch.")
    for name, torch_name in _TORCH_NAMES.items():
        if torch_name == text:
            return name
    raise ValueError(f"dtype {dtype} has no safetensors name")
