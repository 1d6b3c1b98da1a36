"""Parameter search: merge and score every candidate plan of a grid (or a seeded sample of it), keep the best.

Each candidate is the user's plan with the ``--vary`` values set (:mod:`.search_space`), validated by the
plan loader and the job builder — a candidate they refuse is reported as ``invalid`` with their message,
and the search goes on — then merged into a scratch folder, scored by the eval command
(:mod:`.evaluation`) and removed. A failing merge or evaluation is reported as ``failed``.

Parallelism: candidates run on ``jobs`` threads of this process. The merge's heavy work is torch ops and
file I/O, which release the GIL, and the evaluation is a subprocess, so threads run them concurrently
without re-importing torch per candidate (a subprocess per candidate would add about two seconds each) and
share a cancel event that stops merges between tensors and kills running eval commands. Torch's
intra-op thread pool is process-wide, so while the search runs it is divided between the jobs
(``torch.set_num_threads(max(1, threads // jobs))``) instead of each job claiming every core; the eval
commands are the user's and choose their own threads.

Interrupting (Ctrl-C) sets the cancel event, waits for the running candidates to stop and removes the
scratch folder; nothing else is left behind.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mergescope.checkpoints import Cancelled, MergescopeError

from .eval_command import check_template
from .plan import PlanError, parse_plan
from .search_space import Candidate, Variable
from .soup import message_without_lines
from .trial_merge import score_merged_plan, scratch_folder
from .yaml_lines import dump_yaml

HOST = socket.gethostname()

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)


@dataclass
class TuneResult:
    """One candidate's outcome: ``ok`` with a score, ``invalid`` (the plan or job refused it) or ``failed``."""

    candidate: Candidate
    status: str
    score: float | None
    seconds: float
    message: str = ""
    node: str = "local"  # the Ray node id it ran on ("local": this process)
    host: str = ""
    resumed: bool = False  # taken from the search file, not evaluated in this run


def evaluate_candidate(candidate: Candidate, eval_cmd: str, scratch: Path, *, device: str | None = None,
                       timeout: float | None = None, cancel: threading.Event | None = None) -> TuneResult:
    """Validate, merge and score one candidate. A bad candidate is a result, not an exception: ``invalid`` when
    the plan loader or job builder refuses it, ``failed`` when its merge or evaluation fails (an unexpected
    exception included, so that one odd candidate does not end a long search); only a cancel stops it."""
    start = time.perf_counter()
    source = f"candidate {candidate.number}"
    try:
        plan = parse_plan(dump_yaml(candidate.document), source)
        score = score_merged_plan(plan, scratch, eval_cmd, device=device, timeout=timeout, cancel=cancel,
                                  label=f"candidate-{candidate.number}")
    except PlanError as exc:
        message = message_without_lines(str(exc), source)
        return TuneResult(candidate, "invalid", None, time.perf_counter() - start, message)
    except Cancelled:
        return TuneResult(candidate, "cancelled", None, time.perf_counter() - start, "cancelled")
    except MergescopeError as exc:
        return TuneResult(candidate, "failed", None, time.perf_counter() - start, str(exc))
    except Exception as exc:  # noqa: BLE001 - one odd candidate must not end a long search without its results
        return TuneResult(candidate, "failed", None, time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
    return TuneResult(candidate, "ok", score, time.perf_counter() - start)


class ThreadEngine:
    """Candidates on ``jobs`` threads of this process (:func:`run_search`), batch by batch."""

    def __init__(self, eval_cmd: str, *, jobs: int = 1, device: str | None = None, timeout: float | None = None,
                 scratch_dir: str | Path | None = None):
        self.eval_cmd, self.jobs, self.device, self.timeout, self.scratch_dir = (
            eval_cmd, jobs, device, timeout, scratch_dir)

    def __enter__(self) -> ThreadEngine:
        return self

    def __exit__(self, *exc_info) -> None:
        """Each batch removes its own scratch folder."""

    def run(self, candidates: Sequence[Candidate], on_result: Callable[[TuneResult], None]) -> list[TuneResult]:
        return run_search(candidates, self.eval_cmd, jobs=self.jobs, device=self.device, timeout=self.timeout,
                          scratch_dir=self.scratch_dir, on_result=on_result)


def run_search(candidates: Sequence[Candidate], eval_cmd: str, *, jobs: int = 1, device: str | None = None,
               timeout: float | None = None, scratch_dir: str | Path | None = None,
               on_result: Callable[[TuneResult], None] | None = None,
               cancel: threading.Event | None = None) -> list[TuneResult]:
    """Evaluate every candidate on ``jobs`` threads; results in the order they finish. On any exception
    (Ctrl-C) the running candidates are cancelled and the scratch folder removed before it propagates."""
    check_template(eval_cmd)
    if jobs < 1:
        raise MergescopeError(f"--jobs {jobs}: run at least one candidate at a time")
    cancel = cancel or threading.Event()
    parent = Path(scratch_dir) if scratch_dir else Path(tempfile.gettempdir())
    scratch = scratch_folder(parent, ".mergescope-tune-scratch-", "the candidates")
    results: list[TuneResult] = []
    try:
        threads = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="mergescope-tune")
        with torch_threads_divided(jobs), threads as pool:
            pending = {
                pool.submit(evaluate_candidate, c, eval_cmd, scratch, device=device, timeout=timeout, cancel=cancel)
                for c in candidates
            }
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        results.append(future.result())
                        results[-1].host = HOST
                        if on_result is not None:
                            on_result(results[-1])
            except BaseException:
                cancel.set()
                for future in pending:
                    future.cancel()
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


@contextmanager
def torch_threads_divided(jobs: int) -> Iterator[None]:
    """Divide torch's intra-op threads between ``jobs`` concurrent merges, restoring the count afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, previous // jobs))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def ranked(results: Sequence[TuneResult]) -> list[TuneResult]:
    """Scored candidates best first (ties: the lower candidate number), then the others by number."""
    scored = sorted((r for r in results if r.status == "ok"), key=lambda r: (-r.score, r.candidate.number))
    others = sorted((r for r in results if r.status != "ok"), key=lambda r: r.candidate.number)
    return scored + others


def best_result(results: Sequence[TuneResult]) -> TuneResult:
    """The best scored candidate; a one-line error citing the first problem when none could be scored."""
    order = ranked(results)
    if not order or order[0].status != "ok":
        first = order[0].message if order else "there were no candidates"
        raise MergescopeError(f"no candidate could be scored ({len(order)} tried); the first problem: {first}")
    return order[0]


def best_plan_text(best: TuneResult, variables: Sequence[Variable], eval_cmd: str, tried: int) -> str:
    """The best candidate's plan as mergekit YAML, under a comment header with its score and values."""
    header = [f"best of {tried} candidates by mergescope tune: score {best.score:.6g}",
              f"eval command: {' '.join(eval_cmd.split())}"]  # one comment line, whatever the command holds
    header += [f"  {v.key} = {value}" for v, value in zip(variables, best.candidate.values)]
    return "".join(f"# {line}\n" for line in header) + dump_yaml(best.candidate.document)
