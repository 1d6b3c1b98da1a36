"""Reading ahead: the next items' tensors are read in a thread pool while the current one is computed."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from itertools import islice
from typing import TypeVar

Item = TypeVar("Item")
Loaded = TypeVar("Loaded")


def read_ahead(items: Iterable[Item], read: Callable[[Item], Loaded], pool: Executor,
               depth: int) -> Iterator[tuple[Item, Future[Loaded]]]:
    """Yield ``(item, future of read(item))`` in order, reads submitted to ``pool`` ahead of their use.

    The first ``depth + 1`` reads are submitted at once; taking an item submits the read of the next one
    not yet submitted, so while the caller works on item k the reads of items k + 1 … k + depth + 1 are
    queued or done: at most ``depth + 2`` items' data are alive, whatever the number of items.
    """
    upcoming = iter(items)
    pending = deque((item, pool.submit(read, item)) for item in islice(upcoming, depth + 1))
    while pending:
        item, future = pending.popleft()
        pending.extend((following, pool.submit(read, following)) for following in islice(upcoming, 1))
        yield item, future
