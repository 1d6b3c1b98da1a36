"""The search loop: a strategy's batches, evaluated by an engine (threads or Ray), recorded in the store.

For each batch the strategy hands out (:mod:`.search_strategy`), the candidates are numbered on from the
previous batch; the ones the search file already holds (``--resume``) are taken from it — their values
must be the ones the strategy asked for again, or the file belongs to another search — and the rest go to
the engine, each recorded in the file the moment it finishes. The strategy is told the batch's scores in
candidate order once the whole batch is in, so what it asks next does not depend on which candidate
finished first, on how many ran at once, or on whether they were evaluated now or in an earlier run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Protocol

from mergescope.checkpoints import MergescopeError

from .search_space import Candidate, Variable, candidates
from .search_store import SearchStore, Trial
from .tune import TuneResult
from .yaml_lines import dump_yaml


class Engine(Protocol):
    def run(self, candidates: Sequence[Candidate], on_result: Callable[[TuneResult], None]) -> list[TuneResult]:
        ...


class Strategy(Protocol):
    total: int

    def next_batch(self) -> list[tuple] | None:
        ...

    def tell(self, scores: Sequence[float | None]) -> None:
        ...


def run_strategy(strategy: Strategy, document: dict, variables: Sequence[Variable], engine: Engine,
                 store: SearchStore | None = None,
                 on_result: Callable[[TuneResult], None] | None = None) -> list[TuneResult]:
    """Run the search to its end; every result (resumed ones included, marked ``resumed``) in candidate
    order. ``on_result`` sees each as it arrives (resumed ones first in each batch)."""
    stored = store.trials() if store is not None else {}
    results: list[TuneResult] = []
    batch_number = 0
    while (points := strategy.next_batch()) is not None:
        batch_number += 1
        batch = candidates(document, list(variables), points, first=len(results) + 1)
        known = {c.number: _resumed(c, stored[c.number], store) for c in batch if c.number in stored}
        for result in known.values():
            if on_result is not None:
                on_result(result)

        def record(result: TuneResult, batch_number: int = batch_number) -> None:
            if store is not None and result.status != "cancelled":
                c = result.candidate
                store.record(c.number, batch_number, c.values, dump_yaml(c.document), result.status, result.score,
                             result.seconds, result.node, result.host, result.message)
            if on_result is not None:
                on_result(result)

        fresh = engine.run([c for c in batch if c.number not in known], record)
        by_number = {**known, **{r.candidate.number: r for r in fresh}}
        ordered = [by_number[c.number] for c in batch]
        results += ordered
        strategy.tell([r.score if r.status == "ok" else None for r in ordered])
    return results


def _resumed(candidate: Candidate, trial: Trial, store: SearchStore | None) -> TuneResult:
    if json.loads(json.dumps(list(candidate.values))) != trial.point:
        where = store.path if store is not None else "the search file"
        raise MergescopeError(
            f"{where}: candidate {candidate.number} was {trial.point} there but the search now asks for "
            f"{list(candidate.values)}; the file belongs to another search (remove it to start afresh)"
        )
    return TuneResult(candidate, trial.status, trial.score, trial.seconds, trial.message, trial.node, trial.host,
                      resumed=True)
