"""The model card (README.md) written beside a merged model, with Hugging Face metadata."""

from __future__ import annotations

import re

import yaml

from .plan import PLAN_FILE_NAME, MergePlan


def model_card(plan: MergePlan, references: list[str]) -> str:
    """The card of a merge of ``plan`` over the checkpoints it opened (``references``, as the plan names them):
    YAML front matter (base models, library, tags), the models, and the plan itself."""
    sources = list(dict.fromkeys([*([plan.base_model] if plan.base_model else []), *references]))
    metadata = {
        "base_model": sources if len(sources) > 1 else sources[0],
        "library_name": "transformers",
        "tags": ["merge", "mergescope", plan.merge_method],
    }
    front = yaml.safe_dump(metadata, sort_keys=False).strip()
    models = "\n".join(f"- {_code(ref)}" for ref in sources)
    base = f" with {_code(plan.base_model)} as the base" if plan.base_model else ""
    text = plan.to_yaml().rstrip()
    fence = _ticks(text, 3)
    return (
        f"---\n{front}\n---\n\n# Merged model\n\n"
        "Made with [mergescope](https://pypi.org/project/mergescope/) "
        f"using the `{plan.merge_method}` method{base}.\n\n"
        f"## Models\n\n{models}\n\n"
        f"## Plan\n\nThe plan is mergekit YAML (`{PLAN_FILE_NAME}`), so mergekit can run it too:\n\n"
        f"{fence}yaml\n{text}\n{fence}\n"
    )


def _ticks(text: str, least: int) -> str:
    """A run of backticks longer than any in ``text`` (at least ``least``): what fences it in Markdown."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(least, longest + 1)


def _code(text: str) -> str:
    """``text`` as one Markdown code span, whatever backticks or line breaks it holds (model names are input)."""
    flat = " ".join(text.split())
    ticks = _ticks(flat, 1)
    return f"{ticks} {flat} {ticks}" if flat.startswith("`") or flat.endswith("`") else f"{ticks}{flat}{ticks}"
