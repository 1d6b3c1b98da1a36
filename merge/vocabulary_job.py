"""A job's vocabulary: with tokenizer settings in the plan, the output vocabulary and, on every embedding and
head task, the row alignment of its inputs (:mod:`.vocabulary_merge`); computed from tokenizer files and
headers before anything runs, every problem reported with the others.

A model without a ``tokenizer.json`` is taken to share the reference's vocabulary (as mergekit 0.1.5 does), with
a warning; the reference itself needs one.
"""

from __future__ import annotations

from mergescope.checkpoints import Checkpoint, MergescopeError, open_checkpoint
from mergescope.checkpoints.vocabulary import Vocabulary, checkpoint_vocabulary, is_vocabulary_tensor, model_rows

from .plan import MergePlan, PlanProblems
from .vocabulary_merge import OutputVocabulary, VocabularyError, output_vocabulary, row_alignment


def plan_vocabulary(plan: MergePlan, opened: dict[str, Checkpoint], reference: str, order: list[str],
                    tasks: list, problems: PlanProblems, warnings: list[str]) -> OutputVocabulary | None:
    """The output vocabulary of ``plan`` (None without tokenizer settings); sets ``vocabulary`` and the output
    shape of every embedding and head task in ``tasks``. ``order`` is the models in plan order, reference first."""
    settings = plan.tokenizer
    if settings is None:
        warnings.extend(renumbered_vocabularies(opened, reference, order))
        return None
    named = [ref for ref in settings.models if ref not in opened]
    for ref in named:
        try:
            opened[ref] = open_checkpoint(ref)
        except MergescopeError as exc:
            problems.add(0, f"tokenizer source {ref}: {exc}")
    vocabularies: dict[str, Vocabulary] = {}
    for ref in dict.fromkeys([reference, *order, *named]):
        if ref not in opened:
            continue
        try:
            vocabulary = checkpoint_vocabulary(opened[ref])
        except MergescopeError as exc:
            problems.add(0, str(exc))
            continue
        if vocabulary is None and ref == reference:
            problems.add(0, f"{ref} has no tokenizer.json: merging by token needs the reference model's tokenizer")
        elif vocabulary is None:
            warnings.append(f"{ref} has no tokenizer.json; taken to share {reference}'s vocabulary")
        if vocabulary is not None:
            vocabularies[ref] = vocabulary
    if reference not in vocabularies or problems:
        return None
    for ref in opened:
        if ref not in vocabularies:
            vocabularies[ref] = vocabularies[reference].limited(model_rows(opened[ref]))
    out = output_vocabulary(settings, reference, list(dict.fromkeys([reference, *order])), vocabularies)
    for task in tasks:
        if not is_vocabulary_tensor(task.output):
            continue
        try:
            task.vocabulary = row_alignment(out, [ref for ref, _ in task.reads], vocabularies, settings,
                                            plan.base_model)
        except VocabularyError as exc:
            problems.add(0, f"tokenizer.tokens: {exc}")
            return None
        task.shape = (out.rows, *task.shape[1:])
    return out


def renumbered_vocabularies(opened: dict[str, Checkpoint], reference: str, order: list[str]) -> list[str]:
    """Without tokenizer settings rows merge by id: a warning for each model whose vocabulary has as many rows as
    the reference's but other tokens at some of them (a renamed reserved token, another tokenizer). Tokenizers
    with the same fingerprint are not read."""
    found = []
    base = opened.get(reference)
    for ref in dict.fromkeys(order):
        model = opened.get(ref)
        if base is None or model is None or ref == reference or model.tokenizer_fingerprint in (
                None, base.tokenizer_fingerprint) or base.tokenizer_fingerprint is None:
            continue
        try:
            ours, theirs = checkpoint_vocabulary(base), checkpoint_vocabulary(model)
        except MergescopeError:
            continue
        if ours is None or theirs is None or model_rows(model) != model_rows(base):
            continue  # a different row count is refused with its own message
        moved = [t for t, i in theirs.tokens.items() if ours.tokens.get(t) != i]
        if moved:
            shown = ", ".join(repr(t) for t in moved[:3]) + (", …" if len(moved) > 3 else "")
            found.append(f"{ref}: {len(moved)} tokens sit at other rows than in {reference} ({shown}); rows are merged "
                         "by id — set tokenizer_source (union, base or a model) to merge them by token")
    return found
