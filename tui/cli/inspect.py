"""``mergescope inspect TARGET...``: open the Textual app."""

from __future__ import annotations


def run_inspect(targets: list[str], *, base: str | None = None, device: str = "auto", use_cache: bool = True) -> int:
    """Open the TUI on ``targets``: BASE MODEL..., a PLAN.yml, a merged folder or a demo workspace.

    The targets are resolved (headers only) before the app starts, so a bad path is a one-line error.
    """
    # Imported when inspect runs, not when the CLI loads: the app brings in textual and torch, and
    # `mergescope --help` must answer without either (tests/test_cli.py checks).
    from mergescope.tui.app import MergescopeApp
    from mergescope.tui.session import open_session

    session = open_session(targets, base=base)
    MergescopeApp(session, device=device, use_cache=use_cache).run()
    return 0
