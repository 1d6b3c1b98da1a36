"""SIGTERM handled like Ctrl-C by long-running commands, so that their cleanup (scratch folders, the
writer's temporary folder) runs before the process exits, and how such a command reports being stopped."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(BaseException):
    """SIGTERM, raised in the main thread."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in the main thread."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stopped(exc: KeyboardInterrupt | Terminated) -> tuple[str, int]:
    """The word and exit status for a command stopped by Ctrl-C (``interrupted``, 130) or SIGTERM
    (``terminated``, 143): 128 + the signal's number, as a shell reports a process the signal killed."""
    return (
        ("interrupted", 128 + signal.SIGINT)
        if isinstance(exc, KeyboardInterrupt)
        else ("terminated", 128 + signal.SIGTERM)
    )
