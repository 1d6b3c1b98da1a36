"""``mergescope info``: what a checkpoint is, from its headers alone."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from mergescope.checkpoints import Checkpoint, LoraCheckpoint, layer_index, open_checkpoint
from mergescope.tui.formatting import human_bytes, human_count


def describe(checkpoint: Checkpoint) -> dict:
    """The facts ``info`` shows, as plain data (also the ``--json`` output)."""
    config = checkpoint.config
    groups = checkpoint.groups()
    facts = {
        "name": checkpoint.name,
        "source": checkpoint.source,
        "format": checkpoint.kind,
        "architecture": config.architecture,
        "model_type": config.model_type,
        "layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "dtypes": dict(checkpoint.dtypes.most_common()),
        "parameters": checkpoint.num_parameters,
        "bytes": checkpoint.num_bytes,
        "tensors": len(checkpoint),
        "shards": len(checkpoint.files),
        "tokenizer_fingerprint": checkpoint.tokenizer_fingerprint,
        "groups": list(groups),
    }
    if isinstance(checkpoint, LoraCheckpoint):
        adapter = checkpoint.adapter
        ranks = sorted({t.rank for t in adapter.targets.values()})
        facts["shards"] = 1
        facts["adapter"] = {
            "base": checkpoint.base.source,
            "targets": len(adapter.targets),
            "ranks": ranks,
            "replaced": sorted(adapter.replaced),
        }
    return facts


def _group_summary(groups: list[str]) -> str:
    numbered = [g for g in groups if layer_index(g) is not None]
    others = [g for g in groups if layer_index(g) is None]
    parts = others[:]
    if numbered:
        prefix = numbered[0].rsplit(".", 1)[0]
        indices = [layer_index(g) for g in numbered]
        parts.insert(min(1, len(parts)), f"{prefix}.{min(indices)}–{max(indices)}")
    return f"{len(groups)}: " + ", ".join(parts)


def run_info(args: argparse.Namespace) -> int:
    base = open_checkpoint(args.base) if args.base else None
    checkpoint = open_checkpoint(args.checkpoint, base=base)
    facts = describe(checkpoint)
    if args.json:
        if args.tensors:
            facts["tensor_list"] = [
                {"name": s.name, "group": g, "dtype": s.dtype, "shape": list(s.shape)}
                for g, names in checkpoint.groups().items()
                for s in map(checkpoint.spec, names)
            ]
        print(json.dumps(facts, indent=2))
        return 0
    console = Console()
    table = Table(title=f"[bold]{facts['name']}[/]", show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(overflow="fold")
    total = sum(facts["dtypes"].values()) or 1
    dtypes = ", ".join(f"{d} {100 * n / total:.1f}%" for d, n in facts["dtypes"].items())
    architecture = facts["architecture"] or "unknown (no config.json)"
    if facts["model_type"] and facts["model_type"] != facts["architecture"]:
        architecture += f" ({facts['model_type']})"
    rows = [
        ("Source", facts["source"]),
        ("Format", facts["format"]),
        ("Architecture", architecture),
        ("Layers", _or_unknown(facts["layers"])),
        ("Hidden size", _or_unknown(facts["hidden_size"])),
        ("Vocab", _or_unknown(facts["vocab_size"])),
        ("Dtypes", dtypes or "none"),
        ("Parameters", f"{human_count(facts['parameters'])} ({facts['parameters']:,})"),
        ("Size", human_bytes(facts["bytes"])),
        ("Tensors", str(facts["tensors"])),
        ("Shards", str(facts["shards"])),
        ("Tokenizer", facts["tokenizer_fingerprint"] or "none found"),
        ("Groups", _group_summary(facts["groups"])),
    ]
    if "adapter" in facts:
        adapter = facts["adapter"]
        rows.insert(2, ("Adapter", f"LoRA r={'/'.join(map(str, adapter['ranks']))} on {adapter['targets']} weights"
                        + (f", {len(adapter['replaced'])} replaced" if adapter["replaced"] else "")))
        rows.insert(3, ("Base", adapter["base"]))
    for label, value in rows:
        table.add_row(label, value)
    console.print(table)
    if args.tensors:
        console.print(_tensor_table(checkpoint))
    return 0


def _or_unknown(value: object) -> str:
    return "unknown" if value is None else str(value)


def _tensor_table(checkpoint: Checkpoint) -> Table:
    table = Table(title="Tensors", header_style="bold")
    for column in ("group", "tensor", "dtype", "shape"):
        table.add_column(column, overflow="fold")
    for group, names in checkpoint.groups().items():
        for name in names:
            spec = checkpoint.spec(name)
            table.add_row(group, name.removeprefix(group + "."), spec.dtype, "×".join(map(str, spec.shape)) or "scalar")
    return table
