"""Numbers and colours as the app shows them (pure functions, no Textual)."""

from __future__ import annotations

from rich.text import Text

#: backgrounds from "barely changed" to "changed the most" (readable on dark and light themes)
HEAT = ("#1d3557", "#24607a", "#2a9d8f", "#8ab17d", "#e9c46a", "#f4a261", "#e76f51")
SPARK = "▁▂▃▄▅▆▇█"


def fmt_rel(rel: float | None) -> str:
    """A relative delta norm ‖τ‖/‖θ₀‖ as a percentage: ``0.0123`` → ``1.23%``, ``1.41`` → ``141%``."""
    if rel is None:
        return "—"
    pct = rel * 100
    if pct >= 10:
        return f"{pct:.0f}%"
    if pct >= 0.01:
        return f"{pct:.2f}%"
    return f"{pct:.0e}%" if pct else "0%"


def fmt_signed(value: float | None, digits: int = 2) -> str:
    """A cosine or retention: ``0.1234`` → ``+0.12``; None → ``—``."""
    return "—" if value is None else f"{value:+.{digits}f}"


def fmt_pct(value: float | None) -> str:
    """A share in [0, 1] as a whole percentage; None → ``—``."""
    return "—" if value is None else f"{value * 100:.0f}%"


def heat(value: float | None, high: float, text: str | None = None) -> Text:
    """``text`` (default: the relative norm) on a background whose step is ``value / high``."""
    label = fmt_rel(value) if text is None else text
    if value is None or high <= 0:
        return Text(label, style="dim")
    step = min(int(value / high * (len(HEAT) - 1) + 0.5), len(HEAT) - 1)
    foreground = "black" if step >= 3 else "white"
    return Text(label, style=f"{foreground} on {HEAT[step]}")


def sparkline(values: list[float | None], top: float | None = None) -> str:
    """One block character per value, scaled to ``top`` (default: the largest value)."""
    if top is None:
        top = max((v for v in values if v is not None), default=0.0)
    if top <= 0:
        return SPARK[0] * len(values)
    last = len(SPARK) - 1
    return "".join(" " if v is None else SPARK[min(int(v / top * last + 0.5), last)] for v in values)


def short(name: str, width: int) -> str:
    """``name`` cut to ``width`` characters with an ellipsis."""
    return name if len(name) <= width else name[: width - 1] + "…"


def retention_text(value: float | None) -> Text:
    """A retention ⟨τ_m, τᵢ⟩/‖τᵢ‖²: red below 1/3 (the fine-tune mostly lost), yellow below 2/3."""
    if value is None:
        return Text("—", style="dim")
    style = "bold white on #9b2226" if value < 1 / 3 else "black on #e9c46a" if value < 2 / 3 else ""
    return Text(f"{value * 100:.0f}%", style=style)


def abbreviations(names: list[str], width: int) -> list[str]:
    """A label of at most ``width`` characters per name, all different: the name itself when it fits, else its
    start (``ft_reverse`` → ``ft_re``); names whose starts collide (``trap_other_base``, ``trap_grown_vocab``)
    keep the first letter of their shared start and what differs (``t.oth``, ``t.gro``); a number ends any
    label still taken twice."""
    labels = [name if len(name) <= width else name[:width].rstrip("_.-") for name in names]
    for label in set(labels):
        group = [i for i, other in enumerate(labels) if other == label]
        if len(group) < 2:
            continue
        shared = _shared_start([names[i] for i in group])
        for i in group:
            rest = names[i][len(shared):].lstrip("_.-") or names[i]
            labels[i] = (shared[:1] + "." + rest)[:width] if shared else rest[:width]
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        if label in seen or labels.count(label) > 1:
            seen[label] = seen.get(label, 0) + 1
            suffix = str(seen[label])
            labels[i] = label[: width - len(suffix)] + suffix
    return labels


def _shared_start(names: list[str]) -> str:
    """The longest start the names share, cut back to a word boundary (``_``, ``.``, ``-``) when one is in it."""
    start = names[0]
    for name in names[1:]:
        while not name.startswith(start):
            start = start[:-1]
    cut = max(start.rfind(c) for c in "_.-")
    return start[:cut] if cut > 0 else start


def legend(names: list[str], labels: list[str]) -> str:
    """``t.oth trap_other_base · t.gro trap_grown_vocab``: the labels that differ from their names."""
    return " · ".join(f"{label} {name}" for name, label in zip(names, labels) if label != name)
