"""What is known about a tensor before reading it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .dtypes import ITEMSIZE


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's name, safetensors dtype name (``"BF16"``) and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]
