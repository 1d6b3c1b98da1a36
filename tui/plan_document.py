"""The plan builder's model: form values ⇄ a mergekit YAML document (pure, no Textual).

A parameter field holds YAML, so every mergekit value form can be typed: a scalar (``0.5``), a gradient
over the layers (``[0.2, 0.8]``) or filters (``[{filter: mlp, value: 0.3}, {value: 0.5}]``). An empty field
leaves the parameter out (the method's default applies).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import yaml

from mergescope.merge.methods import METHODS, MergeMethod

DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class ModelRow:
    """One model of the session in the builder: whether the plan merges it, and its parameter fields."""

    reference: str  # how the plan names it (path or hub id)
    name: str  # the display name
    included: bool = True
    fields: dict[str, str] = field(default_factory=dict)  # parameter → YAML text


@dataclass
class PlanForm:
    method: str
    base: str | None  # the base_model reference, or None
    models: list[ModelRow]
    options: dict[str, str] = field(default_factory=dict)  # method-level parameter → YAML text
    dtype: str | None = None
    output: str = "merged"
    tokenizer_source: str | None = None  # None: not set (the base's tokenizer; a vocabulary mismatch is refused)
    extra: dict = field(default_factory=dict)  # keys of a loaded plan the form does not edit (kept as they are)


def per_model_parameters(method: MergeMethod) -> list[str]:
    """The per-model parameters the builder offers: those that can change the result."""
    return [p.name for p in method.parameters if p.per_model and not p.ignored]


def method_parameters(method: MergeMethod) -> list[str]:
    """The method-level parameters the builder offers: those that can change the result."""
    return [p.name for p in method.parameters if not p.per_model and not p.ignored]


def parse_field(text: str):
    """A field's YAML text → its value; ``""`` → None (left out). Raises ValueError with a short reason."""
    if not text.strip():
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not YAML: {str(exc).splitlines()[0]}") from None


def format_field(value) -> str:
    """A parameter value as one line of YAML flow text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()


def default_form(method: str, base_reference: str, rows: list[ModelRow]) -> PlanForm:
    """A first plan: the method with equal weights (1/n for averaging methods, 1 for task arithmetic)."""
    form = PlanForm(method, None, rows)
    set_method(form, method, base_reference)
    return form


def set_method(form: PlanForm, name: str, session_base: str) -> list[str]:
    """Switch the method and say what that changed: per-model values the new method also takes are kept,
    the ones it does not use are dropped, required ones are filled, and every method-level option starts from
    the new method's default — ``normalize`` means something else in TIES (divide by the agreeing weights,
    on by default) than in task arithmetic (divide by Σw, off by default), so a value is never carried over."""
    method = METHODS[name]
    previous = form.method
    form.method = name
    notes: list[str] = []
    included = [row for row in form.models if row.included] or form.models
    dropped: set[str] = set()
    for row in form.models:
        dropped |= {p for p, v in row.fields.items() if v and p not in per_model_parameters(method)}
        kept = {p: row.fields.get(p, "") for p in per_model_parameters(method)}
        if "weight" in kept and not kept["weight"]:
            kept["weight"] = "1.0" if method.base_role == "required" else format_field(round(1 / len(included), 4))
        if "density" in kept and not kept["density"] and name not in ("task_arithmetic",):
            kept["density"] = "0.5"
        row.fields = kept
    reset = sorted(p for p, v in form.options.items() if v)
    form.options = dict.fromkeys(method_parameters(method), "")
    if "t" in form.options:
        form.options["t"] = "0.5"
    if dropped and previous != name:
        notes.append(f"dropped {', '.join(sorted(dropped))}: {name} does not use it")
    if reset and previous != name:
        notes.append(f"reset {', '.join(reset)} to {name}'s defaults")
    if method.base_role == "required" and form.base is None:
        form.base = session_base
    elif method.base_role == "input":
        form.base = None  # mergekit would merge the base as one more model
    return notes


def to_document(form: PlanForm) -> dict:
    """The mergekit plan document (raises ValueError naming the field whose YAML does not parse)."""
    document: dict = {"merge_method": form.method}
    method = METHODS.get(form.method)
    if form.base is not None:
        document["base_model"] = form.base
    models = []
    for row in form.models:
        if not row.included:
            continue
        entry: dict = {"model": row.reference}
        params = {}
        for name, text in row.fields.items():
            if _ignored(method, name):
                continue
            value = _field(text, f"{row.name}.{name}")
            if value is not None:
                params[name] = value
        if params:
            entry["parameters"] = params
        models.append(entry)
    document["models"] = models
    options = {name: value for name, text in form.options.items()
               if not _ignored(method, name) and (value := _field(text, name)) is not None}
    if options:
        document["parameters"] = options
    if form.dtype:
        document["dtype"] = form.dtype
    if form.tokenizer_source and "tokenizer" not in form.extra:
        document["tokenizer_source"] = form.tokenizer_source
    for key, value in form.extra.items():
        if key not in document and key != "base_model":
            document[key] = value
    return document


def to_yaml(document: dict) -> str:
    buffer = io.StringIO()
    yaml.safe_dump(document, buffer, sort_keys=False, default_flow_style=None, allow_unicode=True)
    return buffer.getvalue()


def from_plan(plan, rows: list[ModelRow]) -> PlanForm:
    """A form holding a loaded plan: its method, base, per-model and method-level values; the session's
    models the plan does not merge are listed unticked."""
    raw = _plain(plan.raw)
    by_reference = {row.reference: row for row in rows}
    for row in rows:
        row.included = False
    for entry in plan.models or []:
        row = by_reference.get(entry.model)
        if row is None:
            row = ModelRow(entry.model, entry.model)
            rows.append(row)
            by_reference[entry.model] = row
        row.included = True
        row.fields = {k: format_field(v) for k, v in _plain(entry.parameters or {}).items()}
    form = PlanForm(plan.merge_method, plan.base_model, rows,
                    {k: format_field(v) for k, v in _plain(plan.parameters or {}).items()}, plan.dtype)
    form.extra = {k: v for k, v in raw.items()
                  if k not in ("merge_method", "models", "parameters", "dtype", "tokenizer_source")}
    form.tokenizer_source = raw.get("tokenizer_source") if isinstance(raw.get("tokenizer_source"), str) else None
    method = METHODS[plan.merge_method]
    for row in rows:
        for name in per_model_parameters(method):
            row.fields.setdefault(name, "")
    for name in method_parameters(method):
        form.options.setdefault(name, "")
    return form


def _ignored(method: MergeMethod | None, name: str) -> bool:
    """Whether ``method`` accepts ``name`` but never uses it (``density`` in task arithmetic): never written."""
    if method is None:
        return False
    try:
        return method.parameter(name).ignored
    except KeyError:
        return False  # an unknown key stays, so the plan loader names it with its line


def _plain(value):
    """A loaded YAML value with plain dicts and lists (the loader's line-aware dicts do not dump)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _field(text: str, label: str):
    try:
        return parse_field(text)
    except ValueError as exc:
        raise ValueError(f"{label}: {exc}") from None
