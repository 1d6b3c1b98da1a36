"""Merging models whose vocabularies differ: the output vocabulary, and each input's embedding and head rows
re-ordered to it by token string (mergekit 0.1.5's documented semantics).

**Output vocabulary** (:func:`output_vocabulary`), from the first of the base and the plan's models (the
*reference*) and the plan's ``tokenizer`` settings:

* ``base``: the reference's vocabulary; ``<model>``: that model's;
* ``union``: the reference's, then every other model's ordinary tokens it lacks, then every model's added
  tokens it lacks (models in plan order, the base first; each new token takes the next id; an added token
  keeps the settings of the first model that has it, an ordinary token becomes a plain added token);
* tokens named under ``tokenizer.tokens`` that are still missing are appended;
* ``pad_to_multiple_of: m`` rounds the row count up to a multiple of m.

A model's vocabulary counts only tokens with a row (id below its ``vocab_size``).

**Rows** (:func:`row_alignment`): every input of an embedding or head gets one row per output token. An
input that has the token gives its own row. An input that lacks it gets a *fill* row, the same for every
input: the token's only holder's row when one input has it; the base's row when the base is an input and
has it; else the mean of the rows of the inputs that have it; zeros when none has it. A token setting under
``tokens:`` chooses the fill instead (a model's row for the token, a model's row for another token or id,
zeros); with ``force: true`` every input takes the fill, even one that has the token. Rows added by padding
are, per input, the mean of its real rows (:func:`mean_real_row`: float32 sums per chunk of 64 rows, added in
row order in float64, divided by the row count in float64 and rounded once to float32 — the same bits whether
the rows are summed whole or a row block at a time). The method then merges the aligned rows as any tensor, so a token
only one model knows arrives with that model's row, and under a base-relative method (task arithmetic,
TIES…) a token the base has but a fine-tune lacks contributes no change from that fine-tune.

:class:`RowAlignment` is data: per input an index map output row → input row (−1: filled), the fills as
(input, row) lists, the forced rows — applied to whole tensors by :meth:`RowAlignment.align`, or to any
block of output rows by :meth:`RowAlignment.align_rows`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mergescope.checkpoints.vocabulary import Vocabulary
from mergescope.merge.methods.chunks import RowSums

from .tokenizer_settings import TokenizerSettings

# torch is imported inside the functions that use it: start-up cost (mergescope --help)
if TYPE_CHECKING:  # pragma: no cover
    import torch

#: an added token made from a plain string (what ``tokenizer.add_tokens("word")`` records)
PLAIN_ADDED = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False}


class VocabularyError(ValueError):
    """A token setting that cannot be honoured (a model that lacks the token it should give)."""


@dataclass(frozen=True)
class OutputVocabulary:
    """The merged model's tokens in row order, built on ``start`` (the tokenizer its files are copied from);
    ``new`` are the tokens appended to ``start`` with their added-token settings; ``rows`` ≥ ``len(tokens)``
    includes the padding."""

    tokens: list[str]
    start: Vocabulary
    new: list[tuple[str, dict]]
    rows: int

    def index(self) -> dict[str, int]:
        return {token: row for row, token in enumerate(self.tokens)}


def output_vocabulary(settings: TokenizerSettings, reference: str, order: Sequence[str],
                      vocabularies: dict[str, Vocabulary]) -> OutputVocabulary:
    """The output vocabulary for ``settings`` (module docstring); ``order`` is the models in plan order
    (the reference first), ``vocabularies`` each model's, already limited to its rows."""
    if settings.source == "base":
        start = vocabularies[reference]
    elif settings.source == "union":
        start = vocabularies[reference]
    else:
        start = vocabularies[settings.source]
    tokens = start.by_id()
    present = set(tokens)
    new: list[tuple[str, dict]] = []

    def append(token: str, settings_of_token: dict) -> None:
        tokens.append(token)
        present.add(token)
        new.append((token, settings_of_token))

    if settings.source == "union":
        added_anywhere = {t for ref in order for t in vocabularies[ref].added}
        for ref in order:
            for token in vocabularies[ref].by_id():
                if token not in present and token not in vocabularies[ref].added and token not in added_anywhere:
                    append(token, dict(PLAIN_ADDED))
        for ref in order:
            vocabulary = vocabularies[ref]
            for token in vocabulary.by_id():
                if token in vocabulary.added and token not in present:
                    append(token, dict(vocabulary.added[token]))
    for token in settings.tokens:
        if token not in present:
            append(token, dict(PLAIN_ADDED))
    rows = len(tokens)
    multiple = settings.pad_to_multiple_of
    if multiple and rows % multiple:
        rows += multiple - rows % multiple
    return OutputVocabulary(tokens, start, new, rows)


@dataclass(frozen=True)
class RowAlignment:
    """How the inputs of one vocabulary tensor map onto the output rows (module docstring).

    ``maps[i][r]`` is input i's row for output row r, −1 when input i takes ``fills[r]``: a list of
    (input, row) pairs to average (empty: zeros). ``forced`` rows take the fill in every input. Rows from
    ``len(maps[i])`` to ``rows`` are padding: each input's mean real row."""

    maps: list[list[int]]
    fills: dict[int, list[tuple[int, int]]]
    rows: int
    forced: frozenset[int] = field(default_factory=frozenset)

    @property
    def real_rows(self) -> int:
        return len(self.maps[0]) if self.maps else 0

    def align(self, tensors: list) -> list:
        """Each input tensor (rows first, any float dtype) re-ordered to the output rows: in the inputs' promoted
        dtype when every row is copied (own rows, a donor's row, zeros), in float32 when a row is a mean (of the
        holders' rows, or padding), so that no mean is rounded to bf16 before the method computes in float32."""
        import torch

        dtype = self.aligned_dtype([tensor.dtype for tensor in tensors])
        fills = self.fill_rows(tensors)
        out = []
        for i, tensor in enumerate(tensors):
            aligned = self.align_rows(i, tensor, 0, self.real_rows, fills, dtype)
            if self.rows > self.real_rows:
                pad = mean_real_row([aligned]).to(dtype)
                aligned = torch.cat([aligned, pad.expand(self.rows - self.real_rows, *aligned.shape[1:])])
            out.append(aligned)
        return out

    def aligned_dtype(self, dtypes: list):
        """The aligned tensors' dtype for inputs of ``dtypes`` (see :meth:`align`)."""
        import torch

        dtype = dtypes[0]
        for other in dtypes[1:]:
            dtype = torch.promote_types(dtype, other)
        if self.rows > self.real_rows or any(len(sources) > 1 for sources in self.fills.values()):
            dtype = torch.promote_types(dtype, torch.float32)
        return dtype

    def own_rows(self, i: int, start: int, stop: int) -> list[int]:
        """Input ``i``'s rows that output rows ``start:stop`` copy (not filled), in output order."""
        return [source for row, source in enumerate(self.maps[i][start:stop], start)
                if source >= 0 and row not in self.forced]

    def align_rows(self, i: int, tensor, start: int, stop: int, fills: dict, dtype, held=None):
        """Output rows ``start:stop`` (real rows only) of input ``i``; ``fills`` from :meth:`fill_rows` (computed
        once per tensor from every input's rows, then shared by all blocks). ``tensor`` is input i whole, or
        with ``held`` (a sorted list of input rows) only those rows: ``tensor[k]`` is input row ``held[k]``."""
        import torch

        index = torch.tensor(self.maps[i][start:stop], dtype=torch.long, device=tensor.device)
        for row in self.forced:
            if start <= row < stop:
                index[row - start] = -1
        out = torch.empty((stop - start, *tensor.shape[1:]), dtype=dtype, device=tensor.device)
        own = index >= 0
        taken = index[own]
        if held is not None:
            taken = torch.searchsorted(torch.tensor(held, dtype=torch.long, device=tensor.device), taken)
        out[own] = tensor[taken].to(dtype)
        for position in torch.nonzero(~own).flatten().tolist():
            out[position] = fills[start + position].to(dtype)
        return out

    def fill_rows(self, tensors: list) -> dict:
        """Every fill row any input needs, in float32."""
        return self.fill_rows_from(lambda i, row: tensors[i][row], tensors[0].shape[1:], tensors[0].device)

    def fill_sources(self) -> list[set[int]]:
        """Per input, the rows of it that some fill row needs (what a block reader reads for the fills)."""
        needed: list[set[int]] = [set() for _ in self.maps]
        for r in self._filled():
            for i, row in self.fills.get(r, []):
                needed[i].add(row)
        return needed

    def fill_rows_from(self, row_of, shape, device) -> dict:
        """:meth:`fill_rows` from ``row_of(i, row)``: input i's row ``row`` (rows of ``shape`` on ``device``);
        each fill is the float32 mean of its sources' rows, zeros without a source."""
        import torch

        rows = {}
        for r in self._filled():
            sources = self.fills.get(r, [])
            if not sources:
                rows[r] = torch.zeros(shape, dtype=torch.float32, device=device)
            else:
                rows[r] = torch.stack([row_of(i, row).float() for i, row in sources]).mean(dim=0)
        return rows

    def _filled(self) -> list[int]:
        needed = set(self.forced)
        for mapping in self.maps:
            needed.update(r for r, source in enumerate(mapping) if source < 0)
        return sorted(needed)


def mean_real_row(blocks: Iterable) -> torch.Tensor:
    """The float32 mean row ([1, *row shape]) of the rows of ``blocks`` (row blocks in order, any float dtype):
    each chunk of 64 rows summed in float32, the chunks' sums added in row order in float64
    (:class:`~.methods.chunks.RowSums`), divided by the row count in float64, rounded once to float32. The
    same bits for any split into blocks."""
    import torch

    sums = None
    row_shape = None
    for block in blocks:
        if sums is None:
            row_shape = tuple(block.shape[1:])
            sums = RowSums((), math.prod(row_shape), block.device, torch.float64)
        sums.add(block.float().reshape(block.shape[0], -1))
    return (sums.finish() / max(sums.rows, 1)).float().reshape(1, *row_shape)


def row_alignment(vocabulary: OutputVocabulary, inputs: Sequence[str], vocabularies: dict[str, Vocabulary],
                  settings: TokenizerSettings, base: str | None) -> RowAlignment:
    """The alignment of one vocabulary tensor whose inputs are the models ``inputs`` (the task's reads, in
    order); ``base`` is the plan's base model. Raises :class:`VocabularyError` for a token setting that names
    a model that is not an input or lacks the token."""
    maps = [[vocabularies[ref].tokens.get(token, -1) for token in vocabulary.tokens] for ref in inputs]
    base_index = inputs.index(base) if base in inputs else None
    fills: dict[int, list[tuple[int, int]]] = {}
    forced = set()
    for row, token in enumerate(vocabulary.tokens):
        setting = settings.tokens.get(token)
        if setting is not None and setting.force:
            forced.add(row)
        holders = [i for i, mapping in enumerate(maps) if mapping[row] >= 0]
        if len(holders) == len(inputs) and row not in forced:
            continue
        if setting is not None and setting.source is not None:
            fills[row] = [_configured_source(token, setting.source, inputs, maps, row, vocabularies)] \
                if setting.source.kind != "zero" else []
        elif len(holders) == 1 or (base_index is not None and base_index in holders):
            donor = holders[0] if len(holders) == 1 else base_index
            fills[row] = [(donor, maps[donor][row])]
        else:
            fills[row] = [(i, maps[i][row]) for i in holders]
    return RowAlignment(maps, fills, vocabulary.rows, frozenset(forced))


def _configured_source(token: str, source, inputs: Sequence[str], maps, row: int,
                       vocabularies: dict[str, Vocabulary]) -> tuple[int, int]:
    if source.model not in inputs:
        raise VocabularyError(f"token {token!r}: its source {source.model} is not a model of this merge")
    i = inputs.index(source.model)
    if source.kind == "model":
        if maps[i][row] < 0:
            raise VocabularyError(f"token {token!r}: {source.model} has no such token to give its row")
        return i, maps[i][row]
    if source.token_id is not None:
        limit = max(vocabularies[source.model].tokens.values(), default=-1) + 1
        if source.token_id >= limit:
            raise VocabularyError(f"token {token!r}: token_id {source.token_id} is past {source.model}'s "
                                  f"{limit} rows")
        return i, source.token_id
    if source.token not in vocabularies[source.model]:
        raise VocabularyError(f"token {token!r}: {source.model} has no token {source.token!r}")
    return i, vocabularies[source.model].tokens[source.token]
