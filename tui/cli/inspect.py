"""``mergescope inspect TARGET...``: open the Textual app (issue 7)."""

from __future__ import annotations

import sys


def run_inspect(targets: list[str]) -> int:
    """Open the TUI on ``targets``: BASE MODEL..., a PLAN.yml, a merged folder or a demo workspace."""
    print("mergescope inspect: not built yet (tracked in issue 7)", file=sys.stderr)
    return 1
