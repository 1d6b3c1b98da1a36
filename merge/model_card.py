"""The model card (README.md) written beside a merged model, with Hugging Face metadata."""

from __future__ import annotations

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
    models = "\n".join(f"- `{ref}`" for ref in sources)
    base = f" with `{plan.base_model}` as the base" if plan.base_model else ""
    return (
        f"---\n{front}\n---\n\n# Merged model\n\n"
        "Made with [mergescope](https://pypi.org/project/mergescope/) "
        f"using the `{plan.merge_method}` method{base}.\n\n"
        f"## Models\n\n{models}\n\n"
        f"## Plan\n\nThe plan is mergekit YAML (`{PLAN_FILE_NAME}`), so mergekit can run it too:\n\n"
        f"```yaml\n{plan.to_yaml().rstrip()}\n```\n"
    )
