"""Errors a user can act on.

Every problem with a user's input ends in a :class:`MergescopeError` whose message is one line that
names the file, tensor or setting at fault and says what to do. The CLI prints it without a traceback
and exits with status 2.
"""

from __future__ import annotations


class MergescopeError(Exception):
    """Base class of every error that is the user's input, not a bug in mergescope."""


class CheckpointError(MergescopeError):
    """A checkpoint cannot be found, opened or read."""


class Cancelled(MergescopeError):
    """A long operation (analysis, preview, merge, evaluation) stopped because its cancel event was set."""
