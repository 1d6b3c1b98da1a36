"""The plan builder's preview, as rows for its table: sampled first, then exact, group by group.

A thin layer over :mod:`mergescope.analysis.preview` (which runs the executor's own tensor function):
it resolves the plan into a job with the app's already-open checkpoints, and turns each
:class:`GroupPreview` into (layer, ‖τ_m‖ text, retention per source).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from mergescope.analysis.plan_warnings import plan_warnings
from mergescope.analysis.preview import GroupPreview, PlanPreview, PreviewProgress, stream_preview
from mergescope.checkpoints import Checkpoint
from mergescope.merge.job import build_job
from mergescope.merge.plan import MergePlan
from mergescope.tui.display import fmt_rel
from mergescope.tui.session import Session
from mergescope.tui.state import AppState

#: (layer label, the merged task vector's norm as text, retention per source)
Row = tuple[str, str, list]
#: (status line, source names, rows so far, the plan's warnings)
PreviewUpdate = tuple[str, list[str], list[Row], list[str], str]


def session_checkpoints(session: Session) -> dict[str, Checkpoint]:
    """The session's open checkpoints keyed by how plans name them (so building a job re-opens nothing)."""
    checkpoints = [session.base, *session.models]
    references = session.references or [c.source for c in checkpoints]
    return dict(zip(references, checkpoints))


#: the merged-norm column's heading: relative to ‖θ₀‖ once the analysis knows every group's ‖θ₀‖, else absolute
RELATIVE_NORM, ABSOLUTE_NORM = "‖τm‖/‖θ₀‖", "‖τm‖"


def norm_unit_note(heading: str) -> str:
    """What the preview's status line adds about the norm column's unit (its own heading is too narrow)."""
    return " · ‖τm‖ in % of ‖θ₀‖" if heading == RELATIVE_NORM else ""


def preview_rows(state: AppState, plan: MergePlan, cancel: threading.Event) -> Iterator[PreviewUpdate]:
    """Yield (status, source names, rows, warnings, norm heading): once after the sampled pass, then as exact
    groups land. The merged norm is relative to ‖θ₀‖ only when the analysis is complete (a streaming report's
    ‖θ₀‖ covers the groups read so far, so its whole-model value is too small); every row has the same unit,
    which the heading names."""
    job = build_job(plan, checkpoints=session_checkpoints(state.session))
    warnings = job.warnings + plan_warnings(job, state.report if state.analysis_done else None)
    relative = state.analysis_done and bool((state.report.get("total") or {}).get("base_norm"))
    report = state.report if relative else {}
    base_norms = {g["name"]: g.get("base_norm") for g in report.get("groups", [])}
    total_base = (report.get("total") or {}).get("base_norm")
    heading = RELATIVE_NORM if relative else ABSOLUTE_NORM
    rows: dict[str, Row] = {}
    names: list[str] = []
    for mode in ("sampled", "exact"):
        done = 0
        for event in stream_preview(job, state.session.base, mode=mode, cancel=cancel, cache=state.sample_cache,
                                    device=state.device):
            if cancel.is_set():
                return
            if isinstance(event, GroupPreview) and mode == "exact":
                rows[event.group.removeprefix("model.")] = _row(event, base_norms.get(event.group))
            elif isinstance(event, PreviewProgress) and mode == "exact":
                done = event.tensors_done
                if done % 16 == 0:
                    status = f"exact preview: {done}/{event.tensors_total} tensors…"
                    yield status, names, list(rows.values()), warnings, heading
            elif isinstance(event, PlanPreview):
                names = event.names
                for group in event.groups:
                    rows[group.group.removeprefix("model.")] = _row(group, base_norms.get(group.group))
                rows["all"] = _row(event.total, total_base, label="all")
                status = "exact preview" if mode == "exact" else "sampled preview; the exact one is running…"
                yield status, names, list(rows.values()), warnings, heading


def vocabulary_line(state: AppState, plan: MergePlan) -> str:
    """The output vocabulary the plan gives: ``output vocabulary: 47 tokens (+4: <pad>, …), 48 rows``; empty without
    a tokenizer setting (the base's tokenizer is copied). Raises the job's PlanError for a plan that cannot run."""
    if plan.tokenizer is None:
        return ""
    job = build_job(plan, checkpoints=session_checkpoints(state.session))
    vocabulary = job.vocabulary
    new = [token for token, _ in vocabulary.new]
    added = f" (+{len(new)}: {', '.join(new[:4])}{', …' if len(new) > 4 else ''})" if new else ""
    rows = f", {vocabulary.rows} rows" if vocabulary.rows != len(vocabulary.tokens) else ""
    return f"output vocabulary: {len(vocabulary.tokens)} tokens{added}{rows}"


def _row(group: GroupPreview, base_norm: float | None, label: str | None = None) -> Row:
    """(label, ‖τ_m‖ — relative to ``base_norm`` when given —, retention per source)."""
    if base_norm:
        norm = fmt_rel(group.merged_norm / base_norm)
    else:
        norm = f"{group.merged_norm:.3g}"
    return (label or group.group.removeprefix("model."), norm, list(group.retention))
