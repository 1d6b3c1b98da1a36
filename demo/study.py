"""The diagnosis study's plans and measurements on a demo workspace (``benchmarks/diagnosis_study.py``).

:func:`study_plans` generates the plans — every demo-relevant method over the workspace's three fine-tunes,
with weights, densities, λ, normalize on and off, subsets of two and three fine-tunes, negations, slerp
factors and layer gradients — as mergekit documents naming folders of the workspace. :func:`measure_plan`
merges one, measures each task's accuracy, diagnoses the merge against its sources, and returns one
:class:`Pair` per source fine-tune: its measured kept share (:func:`~mergescope.analysis.ground_truth.kept_share`)
and the candidate statistics (:func:`~mergescope.analysis.ground_truth.source_statistics`, and
:func:`~mergescope.analysis.ground_truth.span_statistics` of the Gram matrix computed here from the tensors).

A slerp plan's ``base_model`` is one of the two fine-tunes (t = 0), so the plan's own base is not θ₀; those
merges are diagnosed against the workspace's base with both fine-tunes as sources (:func:`diagnose`), and
every other plan through :func:`diagnose_merged_folder` (with the base passed for linear plans, which name
none).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from mergescope.analysis.diagnosis import diagnose, diagnose_merged_folder
from mergescope.analysis.ground_truth import kept_share, loss_parts, source_statistics, span_statistics
from mergescope.checkpoints import open_checkpoint
from mergescope.merge.executor import run_merge
from mergescope.merge.job import build_job
from mergescope.merge.plan import parse_plan

from .evaluate import evaluate
from .story import FINE_TUNES

BASE = "base"
ADD, REVERSE, SORT = "ft_add", "ft_reverse", "ft_sort"
LETTER = {ADD: "A", REVERSE: "R", SORT: "S"}


@dataclass(frozen=True)
class StudyPlan:
    """A plan of the study: a name and a mergekit document whose model references are workspace folders."""

    name: str
    document: dict
    family: str

    @property
    def method(self) -> str:
        return self.document["merge_method"]

    def absolute(self, root: Path) -> dict:
        """The document with every workspace folder made an absolute path under ``root``."""
        document = copy.deepcopy(self.document)
        if "base_model" in document:
            document["base_model"] = str(root / document["base_model"])
        for entry in document["models"]:
            entry["model"] = str(root / entry["model"])
        return document

    def key(self) -> str:
        """A digest of the document: a cached measurement is reused only for the same plan."""
        return hashlib.sha256(json.dumps(self.document, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def sources(self) -> list[str]:
        """The fine-tunes the plan merges, in plan order (the base excluded)."""
        return [e["model"] for e in self.document["models"] if e["model"] != BASE]

    @property
    def tasks(self) -> list[str]:
        """The tasks its fine-tunes learned."""
        return [FINE_TUNES[s] for s in self.sources if s in FINE_TUNES]

    def with_changes(self, name: str, family: str | None = None, parameters: dict | None = None,
                     model_parameters: dict[str, dict] | None = None) -> StudyPlan:
        """A copy with method ``parameters`` and per-model parameters (folder → {key: value}) set."""
        document = copy.deepcopy(self.document)
        if parameters:
            document.setdefault("parameters", {}).update(parameters)
        for entry in document["models"]:
            for key, value in (model_parameters or {}).get(entry["model"], {}).items():
                entry.setdefault("parameters", {})[key] = value
        return StudyPlan(name, document, family or self.family)


def _models(weights: dict[str, object], **per_model) -> list[dict]:
    """Model entries with a weight each and the same extra parameters (density…) for all."""
    entries = []
    for model, weight in weights.items():
        parameters = {} if weight is None else {"weight": weight}
        parameters.update(per_model)
        entries.append({"model": model, "parameters": parameters} if parameters else {"model": model})
    return entries


def _plan(name: str, method: str, models: list[dict], *, base: str | None = BASE, family: str | None = None,
          parameters: dict | None = None, seed: int | None = None) -> StudyPlan:
    document: dict = {"merge_method": method}
    if base is not None:
        document["base_model"] = base
    document["models"] = models
    if parameters:
        document["parameters"] = parameters
    document["dtype"] = "float32"
    if seed is not None:
        document["mergescope"] = {"seed": seed}
    return StudyPlan(name, document, family or method)


def study_plans() -> list[StudyPlan]:
    """The study's plans (63), in families: linear, task_arithmetic, negation, ties, dare_ties, breadcrumbs,
    della, dare_linear/della_linear, slerp, gradient."""
    A, R, S = ADD, REVERSE, SORT
    all3, pairs = (A, R, S), ((A, S), (A, R), (R, S))
    plans: list[StudyPlan] = []
    # linear: soups of subsets, unequal weights, normalize off (the whole model scaled), the base as an input
    plans.append(_plan("linear-soup-ARS", "linear", _models(dict.fromkeys(all3, 1.0)), base=None))
    for a, b in pairs:
        plans.append(_plan(f"linear-soup-{LETTER[a]}{LETTER[b]}", "linear", _models({a: 1.0, b: 1.0}), base=None))
    plans.append(_plan("linear-A0.7-S0.3", "linear", _models({A: 0.7, S: 0.3}), base=None))
    plans.append(_plan("linear-A0.6-S0.6-nonorm", "linear", _models({A: 0.6, S: 0.6}), base=None,
                       parameters={"normalize": False}))
    plans.append(_plan("linear-A0.5-S0.5-nonorm", "linear", _models({A: 0.5, S: 0.5}), base=None,
                       parameters={"normalize": False}))
    plans.append(_plan("linear-base-A-S", "linear", _models({BASE: 1.0, A: 1.0, S: 1.0}), base=None))
    # task arithmetic: weights 0.3–1.5, subsets of two and three, λ, normalize
    for w in (0.3, 0.5, 0.7, 1.0, 1.2, 1.5):
        plans.append(_plan(f"ta-AS-{w:g}", "task_arithmetic", _models({A: w, S: w})))
    plans.append(_plan("ta-A1.5-S0.5", "task_arithmetic", _models({A: 1.5, S: 0.5})))
    plans.append(_plan("ta-AR-1", "task_arithmetic", _models({A: 1.0, R: 1.0})))
    plans.append(_plan("ta-RS-1", "task_arithmetic", _models({R: 1.0, S: 1.0})))
    plans.append(_plan("ta-RS-0.6", "task_arithmetic", _models({R: 0.6, S: 0.6})))
    for w in (0.5, 0.7, 1.0):
        plans.append(_plan(f"ta-ARS-{w:g}", "task_arithmetic", _models(dict.fromkeys(all3, w))))
    plans.append(_plan("ta-ARS-1-0.5-1", "task_arithmetic", _models({A: 1.0, R: 0.5, S: 1.0})))
    plans.append(_plan("ta-ARS-1-0.3-1", "task_arithmetic", _models({A: 1.0, R: 0.3, S: 1.0})))
    plans.append(_plan("ta-AS-1-norm", "task_arithmetic", _models({A: 1.0, S: 1.0}), parameters={"normalize": True}))
    plans.append(_plan("ta-ARS-1-norm", "task_arithmetic", _models(dict.fromkeys(all3, 1.0)),
                       parameters={"normalize": True}))
    plans.append(_plan("ta-AS-1-lambda0.6", "task_arithmetic", _models({A: 1.0, S: 1.0}), parameters={"lambda": 0.6}))
    plans.append(_plan("ta-AS-1-lambda1.3", "task_arithmetic", _models({A: 1.0, S: 1.0}), parameters={"lambda": 1.3}))
    plans.append(_plan("ta-ARS-1-lambda0.6", "task_arithmetic", _models(dict.fromkeys(all3, 1.0)),
                       parameters={"lambda": 0.6}))
    # negations: one task vector subtracted
    plans.append(_plan("neg-R1-A-1", "task_arithmetic", _models({R: 1.0, A: -1.0}), family="negation"))
    plans.append(_plan("neg-S1-A-0.5", "task_arithmetic", _models({S: 1.0, A: -0.5}), family="negation"))
    plans.append(_plan("neg-A1-R-0.5", "task_arithmetic", _models({A: 1.0, R: -0.5}), family="negation"))
    # TIES: densities 0.2–0.9, normalize on (its default) and off, a too-low density
    for d in (0.2, 0.5, 0.9):
        plans.append(_plan(f"ties-ARS-d{d:g}", "ties", _models(dict.fromkeys(all3, 1.0), density=d)))
    plans.append(_plan("ties-AS-d0.5", "ties", _models({A: 1.0, S: 1.0}, density=0.5)))
    plans.append(_plan("ties-ARS-d0.5-nonorm", "ties", _models(dict.fromkeys(all3, 1.0), density=0.5),
                       parameters={"normalize": False}))
    plans.append(_plan("ties-AS-d0.7-nonorm", "ties", _models({A: 1.0, S: 1.0}, density=0.7),
                       parameters={"normalize": False}))
    plans.append(_plan("ties-AS-d0.05", "ties", _models({A: 1.0, S: 1.0}, density=0.05)))
    # DARE-TIES (random, seed 0): densities, subsets, normalize, a too-low density with rescale
    for d in (0.3, 0.5, 0.8):
        plans.append(_plan(f"dare_ties-ARS-d{d:g}", "dare_ties", _models(dict.fromkeys(all3, 1.0), density=d), seed=0))
    plans.append(_plan("dare_ties-AS-d0.5", "dare_ties", _models({A: 1.0, S: 1.0}, density=0.5), seed=0))
    plans.append(_plan("dare_ties-AS-d0.9-norm", "dare_ties", _models({A: 1.0, S: 1.0}, density=0.9),
                       parameters={"normalize": True}, seed=0))
    plans.append(_plan("dare_ties-AS-d0.1", "dare_ties", _models({A: 1.0, S: 1.0}, density=0.1), seed=0))
    # breadcrumbs (γ 0.01 by default), della (ε 0.15), their linear variants
    plans.append(_plan("breadcrumbs-ARS-d0.5", "breadcrumbs", _models(dict.fromkeys(all3, 1.0), density=0.5)))
    plans.append(_plan("breadcrumbs-AS-d0.8", "breadcrumbs", _models({A: 1.0, S: 1.0}, density=0.8)))
    plans.append(_plan("breadcrumbs-AS-d0.8-norm", "breadcrumbs", _models({A: 1.0, S: 1.0}, density=0.8),
                       parameters={"normalize": True}))
    plans.append(_plan("della-ARS-d0.5", "della", _models(dict.fromkeys(all3, 1.0), density=0.5), seed=0))
    plans.append(_plan("della-AS-d0.7", "della", _models({A: 1.0, S: 1.0}, density=0.7), seed=0))
    plans.append(_plan("della-AS-d0.8-nonorm", "della", _models({A: 1.0, S: 1.0}, density=0.8),
                       parameters={"normalize": False}, seed=0))
    plans.append(_plan("dare_linear-AS-d0.5", "dare_linear", _models({A: 1.0, S: 1.0}, density=0.5), seed=0,
                       family="dare_linear"))
    plans.append(_plan("della_linear-AS-d0.6", "della_linear", _models({A: 1.0, S: 1.0}, density=0.6), seed=0,
                       family="della_linear"))
    # slerp between two fine-tunes (t = 0 is the first)
    for t in (0.25, 0.5, 0.75):
        plans.append(_plan(f"slerp-AS-t{t:g}", "slerp", _models({A: None, S: None}), base=A, parameters={"t": t}))
    plans.append(_plan("slerp-AR-t0.5", "slerp", _models({A: None, R: None}), base=A, parameters={"t": 0.5}))
    plans.append(_plan("slerp-RS-t0.5", "slerp", _models({R: None, S: None}), base=R, parameters={"t": 0.5}))
    # layer gradients (mergekit lists over the layers, and filtered values)
    plans.append(_plan("grad-ta-A[1,0.3]-S[0.3,1]", "task_arithmetic", _models({A: [1.0, 0.3], S: [0.3, 1.0]}),
                       family="gradient"))
    plans.append(_plan("grad-ta-ARS-R[0,1]", "task_arithmetic", _models({A: 1.0, R: [0.0, 1.0], S: 1.0}),
                       family="gradient"))
    plans.append(_plan("grad-ta-A[1.5,0.5]-S1", "task_arithmetic", _models({A: [1.5, 0.5], S: 1.0}), family="gradient"))
    plans.append(_plan("grad-ties-ARS-d[0.2,0.9]", "ties", _models(dict.fromkeys(all3, 1.0), density=[0.2, 0.9]),
                       family="gradient"))
    plans.append(_plan("grad-ta-AS-mlp0.3", "task_arithmetic", _models(
        {A: [{"filter": "mlp", "value": 0.3}, {"value": 1.0}],
         S: [{"filter": "self_attn", "value": [0.5, 1.0]}, {"value": 1.0}]}),
        family="gradient"))
    plans.append(_plan("grad-linear-A[1,0]-S[0,1]", "linear", _models({A: [1.0, 0.0], S: [0.0, 1.0]}), base=None,
                       family="gradient"))
    return plans


def plan_job(plan: StudyPlan, root: Path):
    """The merge job of ``plan`` on the workspace at ``root``."""
    return build_job(parse_plan(yaml.safe_dump(plan.absolute(root), sort_keys=False), f"<{plan.name}>"))


def diagnosis_document(plan: StudyPlan, root: Path, merged: Path) -> dict:
    """The ``mergescope.diagnosis/1`` document of the merge in ``merged`` against the workspace's base."""
    if plan.method == "slerp":
        base = open_checkpoint(str(root / BASE))
        sources = [open_checkpoint(str(root / s)) for s in plan.sources]
        return diagnose(base, sources, open_checkpoint(str(merged)), names=plan.sources, device="cpu").to_json()
    base = None if plan.document.get("base_model") == BASE else str(root / BASE)
    return diagnose_merged_folder(merged, base=base, device="cpu").to_json()


def _flat(folder: Path, names: list[str]) -> np.ndarray:
    checkpoint = open_checkpoint(str(folder))
    return np.concatenate([checkpoint.read(n, torch.float64).reshape(-1).numpy() for n in names])


def tensor_statistics(root: Path, sources: list[str], merged: Path) -> dict:
    """From the tensors (float64, whole model): ``parts``, each source's
    :func:`~mergescope.analysis.ground_truth.loss_parts`, and ``gram``, the Gram matrix of [τ₁…τₙ, τ_m]."""
    names = sorted(open_checkpoint(str(root / BASE)).tensor_names)
    base = _flat(root / BASE, names)
    tau_merged = _flat(merged, names) - base
    taus = [_flat(root / s, names) - base for s in sources]
    stacked = np.stack([*taus, tau_merged])
    return {
        "parts": {s: loss_parts(t, tau_merged) for s, t in zip(sources, taus)},
        "gram": (stacked @ stacked.T).tolist(),
    }


@dataclass
class Pair:
    """One (plan, source fine-tune) of the study: the measured kept share and the candidate statistics."""

    plan: str
    family: str
    source: str
    task: str
    weight: object
    accuracy: float
    kept: float
    statistics: dict[str, float | None] = field(default_factory=dict)


@dataclass
class Measurement:
    """One plan's merge: accuracies, the diagnosis document, the tensor statistics and the seconds each took
    (:func:`pairs_of` turns it into one :class:`Pair` per source)."""

    plan: str
    key: str
    accuracy: dict[str, float]
    diagnosis: dict
    tensors: dict  # tensor_statistics(): loss parts and the Gram matrix
    merge_seconds: float
    evaluate_seconds: float
    diagnose_seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def measure_plan(plan: StudyPlan, root: Path, out: Path, tasks: list[str] | None = None) -> Measurement:
    """Merge ``plan`` into ``out`` (replacing it), evaluate it on ``tasks`` (default: every task), diagnose it."""
    start = time.perf_counter()
    run_merge(plan_job(plan, root), out, device="cpu", overwrite=True)
    merged = time.perf_counter()
    accuracy = evaluate(out, tasks)
    evaluated = time.perf_counter()
    diagnosis = diagnosis_document(plan, root, out)
    tensors = tensor_statistics(root, plan.sources, out)
    done = time.perf_counter()
    return Measurement(
        plan.name, plan.key(), accuracy, diagnosis, tensors, merged - start, evaluated - merged, done - evaluated
    )


def pairs_of(plan: StudyPlan, measurement: Measurement, reference: dict[str, dict[str, float]]) -> list[Pair]:
    """The (plan, source) pairs: kept share from ``measurement`` and ``reference`` (base's and fine-tunes'
    accuracies by folder), statistics from the diagnosis (loss parts from the tensors when it has none)."""
    by_folder = {Path(s["reference"]).name: s["name"] for s in measurement.diagnosis["sources"]}
    spans = dict(zip(plan.sources, span_statistics(np.array(measurement.tensors["gram"]))))
    found = []
    for entry in plan.document["models"]:
        source = entry["model"]
        if source == BASE or source not in FINE_TUNES:
            continue
        task = FINE_TUNES[source]
        kept = kept_share(measurement.accuracy[task], reference[BASE][task], reference[source][task])
        if kept is None or math.isnan(kept):
            continue
        statistics = source_statistics(measurement.diagnosis, by_folder.get(source, source))
        parts = measurement.tensors["parts"].get(source)
        if parts is not None:
            for part, value in parts.items():
                if statistics.get(f"part_{part}") is None:
                    statistics[f"part_{part}"] = value
        statistics.update(spans.get(source) or {})
        weight = (entry.get("parameters") or {}).get("weight")
        found.append(Pair(plan.name, plan.family, source, task, weight, measurement.accuracy[task], kept, statistics))
    return found
