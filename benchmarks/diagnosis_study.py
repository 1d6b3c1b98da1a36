"""The diagnosis' ground truth: which statistic of a merge predicts the share of each skill it keeps, and
does the plan warnings' advice help? (issue 11)

    python benchmarks/diagnosis_study.py [--workspace bench-out/ws] [--out bench-out/diagnosis-study]
                                         [--json F] [--markdown F] [--pairs] [--rediagnose] [--only NAME…]

On a built demo workspace (``mergescope demo DIR --no-tui``), merges every plan of
:func:`mergescope.demo.study.study_plans` (63: linear, task arithmetic, negations, TIES, DARE-TIES,
breadcrumbs, DELLA, slerp, layer gradients), measures each task's accuracy, diagnoses each merge, and for
every (plan, source fine-tune) pair compares the measured kept share (acc_m − acc_base)/(acc_ft − acc_base)
of the fine-tune's task with each candidate statistic of :mod:`mergescope.analysis.ground_truth`: Spearman's
ρ (permutation p-value, bootstrap 95% interval) and the threshold that best separates kept (≥ 0.5) from lost
(balanced accuracy).

Then the advice check: for every plan on which a rule of :mod:`mergescope.analysis.plan_warnings` fires
(given the workspace's analysis report), its suggested fix is applied, merged and evaluated, and the rule's
success is the number of plans where the fix raised the mean kept share of the plan's positively weighted
fine-tunes. Overshoot variants (the old λ·Σw rule, the overlap-aware retention, the displacement) are
measured side by side. The diagnosis' own next steps are held to the same test (:func:`diagnosis_fixes`):
"lower X's weight to ~w" applied as suggested, "raise its density" as density × 2, and the averaging
finding's "normalize: false".

Merges, accuracies and diagnoses are cached under ``--out`` (one JSON per plan, keyed by the plan's
document and the workspace's weights), so a second run only recomputes the statistics; ``--rediagnose``
recomputes the diagnoses from the kept merged folders (after a change to the diagnosis).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

from mergescope.analysis import run_analysis
from mergescope.analysis.ground_truth import CANDIDATES, KEPT, assess, spearman
from mergescope.analysis.plan_warnings import plan_findings, plan_overlap
from mergescope.checkpoints import open_checkpoint
from mergescope.demo.evaluate import evaluate
from mergescope.demo.story import FINE_TUNES
from mergescope.demo.study import (
    BASE,
    Measurement,
    StudyPlan,
    diagnosis_document,
    measure_plan,
    pairs_of,
    plan_job,
    study_plans,
    tensor_statistics,
)
from mergescope.demo.workspace import read_manifest

REPO = Path(__file__).resolve().parent.parent


# --- measuring, with a cache ------------------------------------------------------------------------------------
class Study:
    """Measures plans on one workspace, caching each plan's measurement as ``out/records/NAME.json``."""

    def __init__(self, workspace: Path, out: Path, rediagnose: bool = False, keep_merges: bool = True):
        self.workspace, self.out, self.rediagnose, self.keep_merges = workspace, out, rediagnose, keep_merges
        manifest = read_manifest(workspace)
        if manifest is None:
            raise SystemExit(f"{workspace}: not a demo workspace (run mergescope demo {workspace} --no-tui)")
        self.weights = manifest["weights_sha256"]
        (out / "records").mkdir(parents=True, exist_ok=True)
        self.seconds = {"merge": 0.0, "evaluate": 0.0, "diagnose": 0.0}
        self.measured = 0
        self.reference = self._reference()

    def _reference(self) -> dict[str, dict[str, float]]:
        """The base's and the fine-tunes' accuracies, measured here (cached with the weights' digests)."""
        path = self.out / "reference.json"
        folders = [BASE, *FINE_TUNES]
        if path.exists():
            cached = json.loads(path.read_text())
            if cached.get("weights") == {f: self.weights[f] for f in folders}:
                return cached["accuracy"]
        accuracy = {f: evaluate(self.workspace / f) for f in folders}
        path.write_text(json.dumps({"weights": {f: self.weights[f] for f in folders}, "accuracy": accuracy}, indent=1))
        return accuracy

    def measure(self, plan: StudyPlan) -> Measurement:
        record = self.out / "records" / f"{plan.name}.json"
        merged = self.out / "merged" / plan.name
        key = f"{plan.key()}-{self.weights[BASE][:12]}"
        if record.exists():
            cached = json.loads(record.read_text())
            cached.setdefault("tensors", None)
            cached.pop("tensor_parts", None)  # the first version's loss parts: recomputed with the Gram below
            if cached.get("key") == key:
                measurement = Measurement(**cached)
                stale = self.rediagnose or measurement.tensors is None
                if not stale:
                    return measurement
                if (merged / "mergekit_config.yml").exists():
                    start = time.perf_counter()
                    if self.rediagnose:
                        measurement.diagnosis = diagnosis_document(plan, self.workspace, merged)
                    measurement.tensors = tensor_statistics(self.workspace, plan.sources, merged)
                    measurement.diagnose_seconds = time.perf_counter() - start
                    record.write_text(json.dumps(measurement.to_json()))
                    return measurement
        measurement = measure_plan(plan, self.workspace, merged)
        measurement.key = key
        self.measured += 1
        self.seconds["merge"] += measurement.merge_seconds
        self.seconds["evaluate"] += measurement.evaluate_seconds
        self.seconds["diagnose"] += measurement.diagnose_seconds
        record.write_text(json.dumps(measurement.to_json()))
        if not self.keep_merges:
            shutil.rmtree(merged, ignore_errors=True)
        return measurement


# --- the statistics against the outcome -----------------------------------------------------------------------
def statistic_table(pairs, permutations: int) -> list:
    kept = [p.kept for p in pairs]
    return [assess(c, [p.statistics.get(c.name) for p in pairs], kept, permutations) for c in CANDIDATES]


TASKS = tuple(FINE_TUNES.values())


def by_task(pairs) -> dict[str, dict[str, float]]:
    """Spearman's ρ of each statistic with the kept share within each task's pairs (tasks differ in how
    sharply their skill depends on the weights, so the pooled ρ mixes three scales)."""
    found: dict[str, dict[str, float]] = {}
    for candidate in CANDIDATES:
        found[candidate.name] = {}
        for task in TASKS:
            chosen = [(p.statistics.get(candidate.name), p.kept) for p in pairs if p.task == task]
            chosen = [(v, k) for v, k in chosen if v is not None and math.isfinite(v)]
            found[candidate.name][task] = (
                spearman([v for v, _ in chosen], [k for _, k in chosen]) if len(chosen) > 2 else float("nan")
            )
    return found


def print_table(assessments, pairs) -> None:
    n_kept = sum(p.kept >= KEPT for p in pairs)
    print(f"\n{len(pairs)} (plan, source) pairs; {n_kept} kept (kept share ≥ {KEPT}), {len(pairs) - n_kept} lost\n")
    tasks = by_task(pairs)
    print(f"{'statistic':<22} {'n':>4} {'Spearman ρ':>10} {'95% bootstrap':>16} {'p':>7}   "
          f"{'best rule':<20} {'bal. acc.':>9}  "
          + " ".join(f"{'ρ ' + t:>9}" for t in TASKS) + "  cuts reaching it")
    for a in sorted(assessments, key=lambda a: -abs(a.rho) if not math.isnan(a.rho) else 0):
        if a.n < 3:
            print(f"{a.name:<22} {a.n:>4}  (not in the diagnosis)")
            continue
        t = a.threshold
        rule = "—" if t is None else t.rule
        accuracy = "—" if t is None else f"{t.balanced_accuracy:.3f}"
        span = "" if t is None else f"[{t.low:.3g}, {t.high:.3g}]"
        per_task = " ".join(f"{tasks[a.name][t]:>+9.2f}" for t in TASKS)
        print(f"{a.name:<22} {a.n:>4} {a.rho:>+10.3f} "
              f"{f'[{a.interval[0]:+.2f}, {a.interval[1]:+.2f}]':>16} {a.p_value:>7.4f}   "
              f"{rule:<20} {accuracy:>9}  {per_task}  {span}")


def print_pairs(pairs) -> None:
    print(f"\n{'plan':<28} {'source':<11} {'acc':>5} {'kept':>6} {'retention':>9} {'cosine':>7} "
          f"{'interf.':>7} {'lost':>6}")
    for p in sorted(pairs, key=lambda p: p.kept):
        s = p.statistics
        fmt = lambda v: "—" if v is None else f"{v:+.2f}"  # noqa: E731
        print(f"{p.plan:<28} {p.source:<11} {p.accuracy:>5.3f} {p.kept:>+6.2f} {fmt(s['retention']):>9} "
              f"{fmt(s['cosine']):>7} {fmt(s['interference']):>7} {fmt(s['lost']):>6}")


# --- the advice check -------------------------------------------------------------------------------------------
def outcome(plan: StudyPlan, pairs) -> float | None:
    """Mean kept share over the plan's fine-tunes whose weight is not negative (a negated one is meant to go)."""
    def positive(weight) -> bool:
        if isinstance(weight, list):
            values = [v for v in weight if isinstance(v, (int, float))]
            return not values or statistics.mean(values) > 0
        return weight is None or not isinstance(weight, (int, float)) or weight > 0

    wanted = [p.kept for p in pairs if positive(p.weight)]
    return statistics.mean(wanted) if wanted else None


def _folder(reference: str) -> str:
    return Path(reference).name


def _scaled(plan: StudyPlan, name: str, factor: float) -> StudyPlan:
    """``plan`` with λ multiplied by ``factor``."""
    lam = float((plan.document.get("parameters") or {}).get("lambda", 1.0))
    return plan.with_changes(name, parameters={"lambda": round(lam * factor, 4)})


def _weight_scaled(plan: StudyPlan, name: str, model: str, factor: float) -> StudyPlan:
    """``plan`` with ``model``'s weight (each value of a gradient) multiplied by ``factor``."""
    weight = next(e["parameters"]["weight"] for e in plan.document["models"] if e["model"] == model)
    scaled = [round(v * factor, 4) for v in weight] if isinstance(weight, list) else round(weight * factor, 4)
    return plan.with_changes(name, model_parameters={model: {"weight": scaled}})


def largest_retention(overlap, min_mass: float) -> float:
    """The largest predicted retention over groups holding ≥ ``min_mass`` of their source's ‖τᵢ‖² (≥ 1: the
    whole model)."""
    if min_mass >= 1:
        return max(overlap.retention.values())
    found = 0.0
    for reference, groups in overlap.by_group.items():
        total = sum(overlap.mass[reference].values())
        found = max([
            found, *(v for g, v in groups.items() if total > 0 and overlap.mass[reference][g] / total >= min_mass)
        ])
    return found


def fixes_for(plan: StudyPlan, job, report: dict) -> list[tuple[str, str, StudyPlan | None]]:
    """(rule, fix, fixed plan) for every rule that fires on ``plan``: the code's rules (plan_findings, with
    the analysis report, and its overshoot rule once more without it) with their suggestion, and overshoot
    variants measured beside them (None: a notice without a fix)."""
    found: list[tuple[str, str, StudyPlan | None]] = []
    normalized = lambda tag: plan.with_changes(  # noqa: E731
        f"{plan.name}~{tag}~normalize", parameters={"normalize": True}
    )
    overlap = plan_overlap(job, report)
    for warning in plan_findings(job, report):
        model = _folder(warning.model) if warning.model else None
        tag = f"{warning.rule}{'-' + model if model else ''}"
        if warning.rule == "linear_sum":
            found.append((warning.rule, "normalize: true", normalized(tag)))
        elif warning.rule == "overshoot" and overlap is not None:
            rule = "overshoot (with the analysis: ρ̂ > 1.1)"
            found.append((rule, "λ × 1/max ρ̂",
                          _scaled(plan, f"{plan.name}~overshoot~lambda{overlap.largest:.3f}", 1 / overlap.largest)))
            found.append((rule, "normalize: true", normalized("overshoot")))
        elif warning.rule in ("low_density", "low_random_density") and model:
            found.append((warning.rule, "density 0.5",
                          plan.with_changes(f"{plan.name}~{tag}~density", model_parameters={model: {"density": 0.5}})))
        elif warning.rule in ("zero_weight", "negative_weight"):
            found.append((warning.rule, "(a notice: no fix suggested)", None))
        else:
            found.append((warning.rule, "(not tested)", None))
    for warning in plan_findings(job, None):
        if warning.rule == "overshoot":
            model = _folder(warning.model)
            weight_factor = None
            for task in job.tasks:
                for (ref, _), params in zip(task.inputs, task.params):
                    if _folder(ref) == model:
                        scale = float(task.options.get("lambda", 1.0)) * float(params.get("weight") or 0.0)
                        weight_factor = scale if weight_factor is None else max(weight_factor, scale)
            found.append(("overshoot (without the analysis: λ·wᵢ > 1.1)", "weight × 1/(λ·wᵢ)",
                          _weight_scaled(plan, f"{plan.name}~overshoot-{model}~weight", model, 1 / weight_factor)))
    # the old rule and other thresholds, measured beside the code's
    parameters = plan.document.get("parameters") or {}
    method = plan.method
    additive = method in (
        "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
        "della_linear",
    )
    if additive and not parameters.get("normalize", method in ("ties", "della")):
        lam = float(parameters.get("lambda", 1.0))
        total = max(lam * sum(float(p.get("weight") or 0.0) for p in task.params) for task in job.tasks)
        if total > 1.5:
            found.append(("variant: λ·Σw > 1.5 (the old rule)", "normalize: true", normalized("overshoot")))
        for threshold, min_mass in ((1.1, 0.05), (1.25, 0.01), (1.5, 0.01), (1.1, 1.0)):
            top = None if overlap is None else largest_retention(overlap, min_mass)
            if top is not None and top > threshold:
                where = "the whole model" if min_mass >= 1 else f"groups ≥ {min_mass:.0%} of ‖τᵢ‖²"
                found.append((f"variant: overlap ρ̂ > {threshold:g}, {where}", "λ × 1/max ρ̂",
                              _scaled(plan, f"{plan.name}~overshoot~lambda{top:.3f}", 1 / top)))
        if overlap is not None and overlap.displacement > 1.5:
            found.append(("variant: displacement > 1.5", "normalize: true", normalized("overshoot")))
    unique: dict[tuple, tuple] = {}
    for rule, fix, fixed in found:  # a rule naming two sources of one plan is one case
        unique.setdefault((rule, fix, fixed.name if fixed else None), (rule, fix, fixed))
    return list(unique.values())


LOWER_WEIGHT = re.compile(r"^lower (?P<who>\S+)'s weight to ~(?P<to>[0-9.eE+-]+) \(from (?P<from>[0-9.eE+-]+)\)")


def diagnosis_fixes(plan: StudyPlan, diagnosis: dict | None) -> list[tuple[str, str, StudyPlan | None]]:
    """(rule, fix, fixed plan) for each next step the plan's own diagnosis suggests: lowering the weight of the
    source that wins where another loses (applied as suggested: its weight × to/from), raising a trimmed
    source's density (× 2, at most 1), merging an averaged source with normalize: false."""
    found: list[tuple[str, str, StudyPlan | None]] = []
    names = {Path(s["reference"]).name: s["reference"] for s in (diagnosis or {}).get("sources", [])}
    for finding in (diagnosis or {}).get("findings", []):
        advice = finding.get("advice") or ""
        if match := LOWER_WEIGHT.match(advice):
            who = _folder(names.get(match["who"], match["who"]))
            factor = float(match["to"]) / float(match["from"])
            weight = next((e.get("parameters", {}).get("weight") for e in plan.document["models"] if e["model"] == who),
                          None)
            numeric = isinstance(weight, (int, float)) or (
                isinstance(weight, list) and all(isinstance(v, (int, float)) for v in weight))
            fixed = _weight_scaled(plan, f"{plan.name}~diagnosis-lower-{who}", who, factor) if numeric else None
            found.append(("diagnosis: lower the winning source's weight", "its weight × ~1/ratio", fixed))
        elif advice.startswith("raise its density"):
            model = _folder(names.get(finding["source"], finding["source"]))
            entry = next((e for e in plan.document["models"] if _folder(e["model"]) == model), None)
            density = (entry or {}).get("parameters", {}).get("density")
            if isinstance(density, (int, float)):
                fixed = plan.with_changes(f"{plan.name}~diagnosis-density-{model}",
                                          model_parameters={model: {"density": min(1.0, 2 * density)}})
                found.append(("diagnosis: raise the trimmed source's density", "density × 2", fixed))
        elif advice.startswith("raise its weight, or merge with normalize: false"):
            fixed = plan.with_changes(f"{plan.name}~diagnosis-no-normalize", parameters={"normalize": False})
            found.append(("diagnosis: averaging loses it", "normalize: false", fixed))
    return found


def advice_check(study: Study, plans: list[StudyPlan], outcomes: dict[str, float | None], report: dict) -> list[dict]:
    results: dict[tuple[str, str], dict] = {}
    for plan in plans:
        job = plan_job(plan, study.workspace)
        fixes = fixes_for(plan, job, report) + diagnosis_fixes(plan, study.measure(plan).diagnosis)
        unique = {(rule, fix, fixed.name if fixed else None): (rule, fix, fixed) for rule, fix, fixed in fixes}
        for rule, fix, fixed in unique.values():
            entry = results.setdefault((rule, fix), {"rule": rule, "fix": fix, "cases": []})
            if fixed is None or outcomes.get(plan.name) is None:
                entry["cases"].append({"plan": plan.name, "before": outcomes.get(plan.name), "after": None})
                continue
            after = outcome(fixed, pairs_of(fixed, study.measure(fixed), study.reference))
            entry["cases"].append(
                {"plan": plan.name, "fixed": fixed.name, "before": outcomes[plan.name], "after": after}
            )
    for entry in results.values():
        tested = [c for c in entry["cases"] if c["after"] is not None]
        entry["fired"] = len(entry["cases"])
        entry["tested"] = len(tested)
        entry["improved"] = sum(c["after"] > c["before"] for c in tested)
        entry["mean_change"] = statistics.mean(c["after"] - c["before"] for c in tested) if tested else None
        entry["worse_by_0.1"] = sum(c["after"] < c["before"] - 0.1 for c in tested)
    return list(results.values())


def print_advice(results: list[dict]) -> None:
    print(f"\n{'rule':<40} {'fix':<30} {'fired':>5} {'improved':>9} {'mean Δkept':>10} {'worse>0.1':>9}")
    for r in results:
        if r["tested"] == 0:
            print(f"{r['rule']:<40} {r['fix']:<30} {r['fired']:>5}")
            continue
        print(f"{r['rule']:<40} {r['fix']:<30} {r['fired']:>5} {str(r['improved']) + ' of ' + str(r['tested']):>9} "
              f"{r['mean_change']:>+10.3f} {r['worse_by_0.1']:>9}")
        for c in r["cases"]:
            if c["after"] is not None:
                print(f"    {c['plan']:<34} {c['before']:+.2f} → {c['after']:+.2f}")


def markdown(assessments, pairs, advice: list[dict], seconds: float) -> str:
    """The study's tables as Markdown (docs/diagnosis_study.md quotes them)."""
    tasks = by_task(pairs)
    n_kept = sum(p.kept >= KEPT for p in pairs)
    lines = [f"{len(pairs)} (plan, source) pairs from {len({p.plan for p in pairs})} plans; "
             f"{n_kept} kept (kept share ≥ {KEPT}), {len(pairs) - n_kept} lost.", "",
             "| statistic | n | Spearman ρ | 95% bootstrap | p | best rule | balanced accuracy | "
             + " | ".join(f"ρ {t}" for t in TASKS) + " |",
             "| --- | ---: | ---: | :---: | ---: | --- | ---: | " + " | ".join("---:" for _ in TASKS) + " |"]
    for a in sorted(assessments, key=lambda a: -abs(a.rho) if not math.isnan(a.rho) else 0):
        t = a.threshold
        p_value = "< 0.001" if a.p_value < 0.001 else f"{a.p_value:.3f}"
        lines.append(f"| `{a.name}` | {a.n} | {a.rho:+.2f} | [{a.interval[0]:+.2f}, {a.interval[1]:+.2f}] | "
                     f"{p_value} | "
                     f"{'—' if t is None else t.rule} | {'—' if t is None else f'{t.balanced_accuracy:.2f}'} | "
                     + " | ".join(f"{tasks[a.name][task]:+.2f}" for task in TASKS) + " |")
    lines += ["", "| rule | fix | cases | fix raised the kept share | mean change | worse by > 0.1 |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in advice:
        if r["tested"]:
            lines.append(f"| {r['rule']} | {r['fix']} | {r['fired']} | {r['improved']} of {r['tested']} | "
                         f"{r['mean_change']:+.2f} | {r['worse_by_0.1']} |")
        else:
            lines.append(f"| {r['rule']} | {r['fix']} | {r['fired']} | — | — | — |")
    lines += ["", f"Run time {seconds:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=REPO / "bench-out" / "ws")
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "diagnosis-study")
    parser.add_argument("--json", type=Path, help="write plans, pairs, the table and the advice check here")
    parser.add_argument("--only", nargs="*", help="only the plans whose name contains one of these")
    parser.add_argument("--pairs", action="store_true", help="also print every pair, by kept share")
    parser.add_argument("--rediagnose", action="store_true", help="recompute the diagnoses of cached merges")
    parser.add_argument("--no-advice", action="store_true", help="skip the advice check")
    parser.add_argument("--permutations", type=int, default=2000)
    parser.add_argument("--markdown", type=Path, help="write the tables as Markdown here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    workspace = args.workspace.resolve()
    study = Study(workspace, args.out.resolve(), rediagnose=args.rediagnose)
    plans = [p for p in study_plans() if not args.only or any(o in p.name for o in args.only)]
    print(f"workspace {workspace}; {len(plans)} plans; base accuracy {study.reference[BASE]}")
    pairs, outcomes = [], {}
    for index, plan in enumerate(plans):
        plan_pairs = pairs_of(plan, study.measure(plan), study.reference)
        pairs += plan_pairs
        outcomes[plan.name] = outcome(plan, plan_pairs)
        print(f"\r  measured {index + 1}/{len(plans)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    assessments = statistic_table(pairs, args.permutations)
    print_table(assessments, pairs)
    if args.pairs:
        print_pairs(pairs)
    advice = []
    if not args.no_advice:
        base = open_checkpoint(str(workspace / BASE))
        report = run_analysis(
            base, [open_checkpoint(str(workspace / f)) for f in FINE_TUNES], device="cpu", use_cache=False
        )
        advice = advice_check(study, plans, outcomes, report)
        print_advice(advice)
    elapsed = time.perf_counter() - start
    print(f"\nrun time {elapsed:.1f} s; {study.measured} merges measured now (merge {study.seconds['merge']:.1f} s, "
          f"evaluate {study.seconds['evaluate']:.1f} s, diagnose {study.seconds['diagnose']:.1f} s), "
          f"the rest from the cache")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(assessments, pairs, advice, elapsed))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "workspace": str(workspace),
            "reference": study.reference,
            "plans": [
                {"name": p.name, "family": p.family, "document": p.document, "outcome": outcomes[p.name]}
                for p in plans
            ],
            "pairs": [asdict(p) for p in pairs],
            "statistics": [a.to_json() for a in assessments],
            "statistics_by_task": by_task(pairs),
            "advice": advice,
            "seconds": elapsed,
        }, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
