"""Candidates as Ray tasks: each merged into node-local scratch, scored and removed on whichever node runs it.

``--ray`` starts a Ray instance on this machine for the search; ``--ray ADDRESS`` joins an existing cluster
(``auto``, ``HOST:6379`` or ``ray://HOST:10001``; every node needs mergescope installed, and the models and
the eval command's files at the same paths). Each candidate is one task asking for ``--cpus-per-trial``
CPUs and ``--gpus-per-trial`` GPUs, so Ray runs as many at once as the cluster's resources allow. The task
runs :func:`.tune.evaluate_candidate` under ``<scratch>/mergescope-search-<id>`` on its node (``--scratch``,
else the node's temporary folder), with torch limited to its CPUs, and returns the result with its node id
and host name.

A candidate whose merge or evaluation fails (or whose eval command runs past ``--timeout``) comes back as
``failed``; a task whose worker dies (killed, out of memory) is retried by Ray ``retries`` times and then
recorded as ``failed`` with Ray's reason. Interrupting cancels every task (Ray raises KeyboardInterrupt in
a running one, which kills its eval command and removes its folder), then a clean-up task on every live
node removes the search's scratch folder, which also clears what a killed worker left.

Ray is imported only when a search asks for it (it is an optional extra and takes a second to import).
"""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from mergescope.checkpoints import MergescopeError

from .search_space import Candidate
from .tune import TuneResult, evaluate_candidate

RAY_MISSING = "--ray needs Ray, an optional extra: pip install 'mergescope[ray]' (or pip install ray)"
LOCAL_OBJECT_STORE = 256 * 1024**2  # candidates and results are small; a local instance needs no more


def import_ray():
    try:
        import ray
    except ImportError:
        raise MergescopeError(RAY_MISSING) from None
    return ray


def scratch_root(scratch: str | None, search_id: str) -> Path:
    return Path(scratch or tempfile.gettempdir()) / f"mergescope-search-{search_id}"


def trial_task(candidate: Candidate, eval_cmd: str, scratch: str | None, search_id: str, device: str | None,
               timeout: float | None, cpus: float) -> TuneResult:
    """What a Ray worker runs for one candidate (see the module docstring)."""
    import ray
    import torch

    torch.set_num_threads(max(1, int(cpus)))
    result = evaluate_candidate(candidate, eval_cmd, scratch_root(scratch, search_id), device=device, timeout=timeout)
    result.node = ray.get_runtime_context().get_node_id()
    result.host = socket.gethostname()
    return result


def remove_scratch_task(scratch: str | None, search_id: str) -> None:
    shutil.rmtree(scratch_root(scratch, search_id), ignore_errors=True)


class RayEngine:
    """Connects (or starts a local Ray) on enter, runs batches of candidates as tasks, cleans up on exit."""

    def __init__(self, eval_cmd: str, address: str | None, *, cpus_per_trial: float = 1, gpus_per_trial: float = 0,
                 device: str | None = None, timeout: float | None = None, scratch: str | None = None,
                 retries: int = 1):
        if cpus_per_trial <= 0 or gpus_per_trial < 0:
            raise MergescopeError("--cpus-per-trial must be positive and --gpus-per-trial not negative")
        self.eval_cmd, self.address, self.device, self.timeout, self.scratch = (
            eval_cmd, address, device, timeout, scratch)
        self.cpus, self.gpus, self.retries = cpus_per_trial, gpus_per_trial, retries
        self.search_id = uuid.uuid4().hex[:12]
        self._started = False

    def __enter__(self) -> RayEngine:
        ray = import_ray()
        if not ray.is_initialized():
            options = {"logging_level": logging.ERROR, "log_to_driver": False}
            if self.address:
                options["address"] = self.address
            else:
                options.update(include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE)
            try:
                ray.init(**options)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = self.address or "a local Ray instance"
                raise MergescopeError(f"--ray {where}: cannot connect: {str(exc).splitlines()[0]}") from None
            self._started = True
        self._trial = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=self.retries)(trial_task)
        self._cleanup = ray.remote(num_cpus=0, max_retries=0)(remove_scratch_task)
        return self

    def nodes(self) -> list[str]:
        ray = import_ray()
        return [n["NodeID"] for n in ray.nodes() if n.get("Alive")]

    def run(self, candidates: Sequence[Candidate], on_result: Callable[[TuneResult], None]) -> list[TuneResult]:
        ray = import_ray()
        submitted = {}
        for candidate in candidates:
            ref = self._trial.remote(candidate, self.eval_cmd, self.scratch, self.search_id, self.device,
                                     self.timeout, self.cpus)
            submitted[ref] = (candidate, time.perf_counter())
        pending = list(submitted)
        results = []
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=0.5)
                for ref in done:
                    results.append(self._collect(ray, ref, *submitted[ref]))
                    on_result(results[-1])
        except BaseException:
            self._cancel(ray, pending)
            raise
        return results

    @staticmethod
    def _collect(ray, ref, candidate: Candidate, submitted: float) -> TuneResult:
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as exc:  # the worker died (after its retries) or the task was cancelled
            reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            return TuneResult(candidate, "failed", None, time.perf_counter() - submitted,
                              f"Ray task failed: {type(exc).__name__}: {reason}"[:300], node="?")  # node unknown

    def _cancel(self, ray, pending: list) -> None:
        for ref in pending:
            ray.cancel(ref, force=False)
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=15)

    def remove_scratch(self) -> None:
        """Remove the search's scratch folder on every live node (a task pinned to each)."""
        ray = import_ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        refs = [self._cleanup.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                .remote(self.scratch, self.search_id) for node in self.nodes()]
        ray.wait(refs, num_returns=len(refs), timeout=30)

    def __exit__(self, *exc_info) -> None:
        ray = import_ray()
        try:
            if ray.is_initialized():
                self.remove_scratch()
        finally:
            if self._started:
                ray.shutdown()
