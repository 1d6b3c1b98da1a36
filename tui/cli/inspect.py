"""``mergescope inspect TARGET...``: open the Textual app."""

from __future__ import annotations

import argparse

from mergescope.tui.app import MergescopeApp
from mergescope.tui.session import open_session


def run_inspect_command(args: argparse.Namespace) -> int:
    return run_inspect(args.targets, base=args.base, device=args.device, use_cache=not args.no_cache)


def run_inspect(targets: list[str], *, base: str | None = None, device: str = "auto", use_cache: bool = True) -> int:
    """Open the TUI on ``targets``: BASE MODEL..., a PLAN.yml, a merged folder or a demo workspace.

    The targets are resolved (headers only) before the app starts, so a bad path is a one-line error.
    """
    session = open_session(targets, base=base)
    MergescopeApp(session, device=device, use_cache=use_cache).run()
    return 0
