"""Reusable read buffers: a streaming reader reads each tensor or row block into one of a few buffer sets
instead of fresh memory, which would cost a page fault per 4 KiB — as much time as the copy itself.

A set holds one flat uint8 buffer per input (slot). A reader takes a free set (:meth:`ReadBuffers.take`, waiting
while every set is in use), reads into its slots (:meth:`ReadBuffers.slot`), and the consumer gives the set back
(:meth:`ReadBuffers.give_back`) once nothing uses the tensors viewing it: the number of sets bounds memory.
"""

from __future__ import annotations

import queue
from typing import TYPE_CHECKING

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)
if TYPE_CHECKING:  # pragma: no cover
    import torch

#: buffers up to this size are kept for reuse whatever passes through them
KEEP_BUFFER_BYTES = 64 << 20


class ReadBuffers:
    """``sets`` sets of ``slots`` reusable byte buffers."""

    def __init__(self, sets: int, slots: int) -> None:
        self.slots = slots
        self.free: queue.Queue = queue.Queue()
        for _ in range(sets):
            self.free.put([None] * slots)

    def take(self) -> list:
        """A free set (waits for one)."""
        return self.free.get()

    def give_back(self, buffers: list) -> None:
        self.free.put(buffers)

    @staticmethod
    def slot(buffers: list, index: int, nbytes: int) -> torch.Tensor:
        """Slot ``index`` of a set, grown to ``nbytes``; a huge buffer (an embedding's) is given back once only
        much smaller reads pass through it."""
        import torch

        current = buffers[index]
        if current is None or current.numel() < nbytes or current.numel() > max(4 * nbytes, KEEP_BUFFER_BYTES):
            buffers[index] = None
            buffers[index] = torch.empty(nbytes, dtype=torch.uint8)
        return buffers[index]
