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

    @property
    def row_numel(self) -> int:
        """Entries per row (along the first dimension); a 0-dim tensor is one row of one entry."""
        return math.prod(self.shape[1:]) if self.shape else 1

    @property
    def rows(self) -> int:
        """Rows along the first dimension (1 for a 0-dim tensor)."""
        return self.shape[0] if self.shape else 1
