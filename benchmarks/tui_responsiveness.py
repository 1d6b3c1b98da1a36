"""How the TUI answers keys while the analysis streams over the ~267M-parameter benchmark fixture.

Opens the app headless (Textual's Pilot) on the fixture (base + 3 fine-tunes, built once under bench-out/ by
benchmarks/llama_fixture.py), and while the analysis runs presses ↓ repeatedly, timing each key from press
to the heatmap cursor having moved and the screen refreshed. Prints the analysis time alone (no app) as the
floor and the median / max key latency during the pass.

    python benchmarks/tui_responsiveness.py
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    from llama_fixture import build

    from mergescope.analysis import run_analysis
    from mergescope.checkpoints import open_checkpoint
    from mergescope.tui.app import MergescopeApp
    from mergescope.tui.session import open_session

    paths = build(quiet=True)
    targets = [str(paths[n]) for n in ("base", "ft_a", "ft_b", "ft_c")]
    base = open_checkpoint(targets[0])
    start = time.perf_counter()
    run_analysis(base, [open_checkpoint(t, base=base) for t in targets[1:]], use_cache=False)
    floor = time.perf_counter() - start

    async def drive() -> tuple[list[float], list[float], float]:
        app = MergescopeApp(open_session(targets), use_cache=False)
        lags: list[float] = []
        latencies: list[float] = []
        async with app.run_test(size=(120, 40)):
            begin = time.perf_counter()
            loop = asyncio.get_running_loop()
            while not app.state.analysis_done:
                # event-loop lag: how late a 20 ms sleep wakes up while the worker streams
                asked = loop.time()
                await asyncio.sleep(0.02)
                lags.append(loop.time() - asked - 0.02)
                if len(lags) % 10 == 0:  # and a key: from the key event posted to the cursor having moved
                    heatmap = app.screen.query_one("#heatmap")
                    before = heatmap.cursor_row
                    pressed = time.perf_counter()
                    app.simulate_key("down" if before < heatmap.row_count - 1 else "home")
                    while heatmap.cursor_row == before and time.perf_counter() - pressed < 10:
                        await asyncio.sleep(0.001)
                    latencies.append(time.perf_counter() - pressed)
            return lags, latencies, time.perf_counter() - begin

    lags, latencies, with_app = asyncio.run(drive())
    print(
        f"analysis alone: {floor:.2f} s; "
        f"in the app (keys pressed throughout): {with_app:.2f} s ({with_app / floor:.2f}x)"
    )
    print(
        f"event-loop lag during the pass: median {statistics.median(lags) * 1000:.0f} ms, "
        f"p95 {sorted(lags)[int(len(lags) * 0.95)] * 1000:.0f} ms, max {max(lags) * 1000:.0f} ms ({len(lags)} samples)"
    )
    if latencies:
        print(
            f"key press → handled: median {statistics.median(latencies) * 1000:.0f} ms, "
            f"max {max(latencies) * 1000:.0f} ms "
            f"over {len(latencies)} keys"
        )


if __name__ == "__main__":
    main()
