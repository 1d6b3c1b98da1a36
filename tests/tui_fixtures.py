"""Tiny workspaces for the TUI tests: a base and fine-tunes whose task vectors the tests control."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import torch

from builders import llama_config, llama_state, write_model
from mergescope.demo.manifest import MANIFEST, SCHEMA

LAYERS = 4


def build_models(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    """base, ft_a (τ_a), ft_b (a smaller independent τ_b) and ft_c = base − τ_a; written under ``root``."""
    config = llama_config(layers=LAYERS)
    base = llama_state(config, seed=0)
    g = torch.Generator().manual_seed(1)
    tau_a = {k: 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    tau_b = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    states = {
        "base": base,
        "ft_a": {k: base[k] + tau_a[k] for k in base},
        "ft_b": {k: base[k] + tau_b[k] for k in base},
        "ft_c": {k: base[k] - tau_a[k] for k in base},
    }
    for name, state in states.items():
        write_model(root / name, state, config)
    return states


def run(coroutine_function, *args):
    """Run an async test body (the suite has no asyncio plugin)."""
    return asyncio.run(coroutine_function(*args))


async def wait_for_analysis(app, pilot) -> None:
    for _ in range(200):
        await pilot.pause(0.05)
        if app.state.analysis_done or app.state.analysis_error:
            break
    await pilot.pause(0.1)
    assert app.state.analysis_done, app.state.analysis_error


class Posted:
    """The app's own messages as its nodes handle them (``run_test(message_hook=posted)``), each once though a
    bubbling message passes several nodes."""

    def __init__(self) -> None:
        self.messages: dict[int, object] = {}

    def __call__(self, message) -> None:
        if type(message).__module__.startswith("mergescope."):
            self.messages.setdefault(id(message), message)

    def of(self, kind: type) -> list:
        """The messages of ``kind``, in the order the app first handled them."""
        return [m for m in self.messages.values() if isinstance(m, kind)]


def static_text(widget, width: int = 200) -> str:
    """The plain text a Static widget shows (its rich content rendered without styles)."""
    from rich.console import Console

    console = Console(width=width, record=True, color_system=None, file=open("/dev/null", "w"))
    console.print(widget.content)
    return console.export_text()


#: the demo workspace's model names (what the layout has to fit at 80x24), over the fixture's models
DEMO_NAMES = {"ft_add": "ft_a", "ft_reverse": "ft_b", "ft_sort": "ft_c", "lora_sort": "ft_b",
              "trap_other_base": None, "trap_grown_vocab": "ft_a"}


def demo_like(root: Path) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    """A demo-like workspace under ``root``/ws, as small as the demo (2 layers): a base and six models under the
    demo's names — trap_other_base another initialisation, the rest :func:`build_models`' fine-tunes (τ_a, τ_b,
    −τ_a) — and a manifest with the demo's tasks. Returns the folder and the states by fixture name."""
    folder = root / "ws"
    config = llama_config(layers=2)
    base = llama_state(config, seed=0)
    g = torch.Generator().manual_seed(1)
    tau_a = {k: 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    tau_b = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    states = {"base": base, "ft_a": {k: base[k] + tau_a[k] for k in base},
              "ft_b": {k: base[k] + tau_b[k] for k in base}, "ft_c": {k: base[k] - tau_a[k] for k in base}}
    write_model(folder / "base", base, config)
    for name, source in DEMO_NAMES.items():
        write_model(folder / name, states[source] if source else llama_state(config, seed=9), config)
    manifest = {"schema": SCHEMA, "base": "base",
                "fine_tunes": [{"path": n} for n in ("ft_add", "ft_reverse", "ft_sort")],
                "lora": [{"path": "lora_sort"}], "traps": [{"path": "trap_other_base"}, {"path": "trap_grown_vocab"}],
                "tasks": {"add": {}, "reverse": {}, "sort": {}}}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder, states
