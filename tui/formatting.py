"""Human-readable counts and sizes, shared by the command line and the app (pure, no Textual)."""

from __future__ import annotations


def human_count(n: int | float) -> str:
    """``271_400_000`` → ``271.4 M``."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


def human_bytes(n: int | float) -> str:
    """``542_800_000`` → ``542.8 MB`` (decimal units, as the hub shows sizes)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
