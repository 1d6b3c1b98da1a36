"""The model card (README.md) written beside a merged model, with Hugging Face metadata."""

from __future__ import annotations

from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:  # pragma: no cover
    from .job import MergeJob


def model_card(job: "MergeJob") -> str:
    plan = job.plan
    sources = list(dict.fromkeys([*([plan.base_model] if plan.base_model else []), *(job.checkpoints)]))
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
        f"Made with [mergescope](https://pypi.org/project/mergescope/) using the `{plan.merge_method}` method{base}.\n\n"
        f"## Models\n\n{models}\n\n"
        "## Plan\n\nThe plan is mergekit YAML (`mergekit_config.yml`), so mergekit can run it too:\n\n"
        f"```yaml\n{plan.to_yaml().rstrip()}\n```\n"
    )
