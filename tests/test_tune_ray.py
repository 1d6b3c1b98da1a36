"""CMA-ES searches on a real Ray cluster: a head and a second worker node on this machine (1 CPU each).

The eval script scores −‖merged − (base + 0.57·τ_a)‖ on one tensor (:mod:`eval_scripts`), so a search over
``models.0.parameters.weight`` has its optimum at 0.57 and every score can be checked against numpy. A
wrapper around it logs every evaluation (to count them) and, on its third call, kills the Ray worker that
runs it (SIGKILL to its parent), once: Ray must retry that candidate.
"""

from __future__ import annotations

import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import yaml
from ray.cluster_utils import Cluster

from mergescope.tui.cli.main import main
from test_tune import TARGET_WEIGHT, make_setup

OBJECT_STORE = 80 * 1024**2  # Ray's minimum is 75 MiB; candidates and results are a few KB
BUDGET = 16
SEED = 0
WRAPPER = '''
import os, runpy, signal, sys
log, marker, score = {log!r}, {marker!r}, {score!r}
with open(log, "a") as f:
    f.write(sys.argv[1] + "\\n")
calls = sum(1 for _ in open(log))
if calls == 3 and not os.path.exists(marker):
    open(marker, "w").write(str(os.getppid()))
    os.kill(os.getppid(), signal.SIGKILL)  # the Ray worker running this candidate dies
    sys.exit(1)
runpy.run_path(score, run_name="__main__")
'''


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": OBJECT_STORE,
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def counting_eval_command(folder, eval_cmd: str) -> str:
    """Wrap the distance script: log each call; kill the worker on the third call (once)."""
    score_script = shlex.split(eval_cmd)[-2]
    wrapper = folder / "counting.py"
    wrapper.write_text(WRAPPER.format(log=str(folder / "calls.log"), marker=str(folder / "killed"),
                                      score=score_script))
    return f"{shlex.quote(sys.executable)} -S {shlex.quote(str(wrapper))} {{model}}"


def tune_argv(folder, eval_cmd: str, output: str, *extra: str) -> list[str]:
    return ["tune", str(folder / "plan.yml"), "--eval-cmd", eval_cmd, "--vary", "models.0.parameters.weight=0:1",
            "--strategy", "cma", "--budget", str(BUDGET), "--seed", str(SEED), "--device", "cpu",
            "-o", str(folder / output), *extra]


def trials(path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT number, point, status, score, node FROM trials ORDER BY number").fetchall()


def calls(folder) -> int:
    return len((folder / "calls.log").read_text().splitlines())


@pytest.fixture(scope="module")
def ray_search(cluster, tmp_path_factory):
    """One search on the cluster, shared by the tests below (each leaves its files as it found them)."""
    folder, tau, eval_cmd = make_setup(tmp_path_factory.mktemp("ray-search"))
    plan = yaml.safe_load((folder / "plan.yml").read_text())
    plan["models"][1]["parameters"]["weight"] = 0.0  # only τ_a's weight is searched
    (folder / "plan.yml").write_text(yaml.safe_dump(plan, sort_keys=False))
    counting = counting_eval_command(folder, eval_cmd)
    argv = tune_argv(folder, counting, "ray.best.yml", "--ray", cluster.address, "--scratch", str(folder / "scratch"))
    assert main(argv) == 0
    return folder, tau, counting, argv


def test_cma_on_two_ray_nodes_finds_the_optimum_and_survives_a_killed_worker(cluster, ray_search, capsys):
    folder, tau, _, _ = ray_search
    rows = trials(folder / "ray.best.search.db")
    assert [r[0] for r in rows] == list(range(1, BUDGET + 1)) and {r[2] for r in rows} == {"ok"}
    for _, point, _, score, _ in rows:  # every score is the script's distance, computed here in float64
        weight = yaml.safe_load(point)[0]
        assert score == pytest.approx(-(abs(weight - TARGET_WEIGHT) * np.linalg.norm(tau["ft_a"])), rel=1e-4)
    best = max(rows, key=lambda r: r[3])
    assert abs(yaml.safe_load(best[1])[0] - TARGET_WEIGHT) < 0.02  # CMA-ES found the optimum
    written = yaml.safe_load((folder / "ray.best.yml").read_text())
    assert written["models"][0]["parameters"]["weight"] == yaml.safe_load(best[1])[0]
    assert {r[4] for r in rows} == {node.node_id for node in cluster.list_all_nodes()}  # both nodes ran trials
    assert (folder / "killed").exists() and calls(folder) == BUDGET + 1  # the killed candidate ran again
    assert not list((folder / "scratch").glob("*/*")) and not list((folder / "scratch").glob("mergescope-*"))


def test_resume_evaluates_only_what_is_missing(ray_search):
    folder, _, _, argv = ray_search
    db_path = folder / "ray.best.search.db"
    complete, before = trials(db_path), calls(folder)
    assert main([*argv, "--resume"]) == 0
    assert calls(folder) == before and trials(db_path) == complete  # nothing evaluated again
    with sqlite3.connect(db_path) as db:  # as if the search had been interrupted after 11 candidates
        db.execute("DELETE FROM trials WHERE number > 11")
    assert main([*argv, "--resume"]) == 0
    assert calls(folder) == before + BUDGET - 11
    assert [r[:4] for r in trials(db_path)] == [r[:4] for r in complete]  # the same candidates, the same scores
    changed = [*argv[:argv.index("--seed") + 1], "1", *argv[argv.index("--seed") + 2:], "--resume"]
    assert main(changed) == 2


def test_threads_ask_the_same_candidates_as_ray(ray_search):
    folder, _, counting, _ = ray_search
    assert main(tune_argv(folder, counting, "threads.best.yml", "--jobs", "2")) == 0
    on_ray, on_threads = trials(folder / "ray.best.search.db"), trials(folder / "threads.best.search.db")
    assert [r[:4] for r in on_threads] == [r[:4] for r in on_ray]
    assert {r[4] for r in on_threads} == {"local"}


def test_interrupt_cancels_running_trials_and_removes_scratch(cluster, tmp_path):
    folder, _, _ = make_setup(tmp_path)
    slow = folder / "slow.py"
    slow.write_text("import os, sys, time\n"
                    f"open({str(folder / 'started')!r}, 'a').write(str(os.getpid()) + '\\n')\n"
                    "time.sleep(120)\nprint(1)\n")
    eval_cmd = f"{shlex.quote(sys.executable)} {shlex.quote(str(slow))} {{model}}"
    process = subprocess.Popen(
        [sys.executable, "-m", "mergescope.tui.cli.main", *tune_argv(folder, eval_cmd, "best.yml", "--ray",
                                                                     cluster.address, "--scratch",
                                                                     str(folder / "scratch"))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(started := _lines(folder / "started")) < 2:  # one candidate running on each node
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    assert len(list((folder / "scratch").glob("mergescope-search-*/*"))) == 2  # two merged candidates on disk
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted: 0 of 16 candidates finished" in stderr and "Traceback" not in stderr
    assert not list((folder / "scratch").glob("mergescope-search-*"))  # every node's scratch removed
    for pid in map(int, started):  # the running evaluations were killed, not left sleeping
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid)
    assert not (folder / "best.yml").exists() and trials(folder / "best.search.db") == []


def _lines(path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_a_trial_whose_worker_dies_without_retries_is_recorded_and_the_search_goes_on(cluster, tmp_path):
    folder, _, eval_cmd = make_setup(tmp_path)
    counting = counting_eval_command(folder, eval_cmd)
    argv = tune_argv(folder, counting, "best.yml", "--ray", cluster.address, "--retries", "0", "--budget", "8")
    assert main(argv) == 0
    with sqlite3.connect(folder / "best.search.db") as db:
        rows = db.execute("SELECT status, message FROM trials ORDER BY number").fetchall()
    assert len(rows) == 8 and calls(folder) == 8  # the killed candidate was not run again
    failed = [message for status, message in rows if status == "failed"]
    assert len(failed) == 1 and "Ray task failed" in failed[0] and [s for s, _ in rows].count("ok") == 7
    assert [node for (status, _), node in zip(rows, nodes(folder)) if status == "failed"] == ["?"]
    assert (folder / "best.yml").exists()


def nodes(folder) -> list[str]:
    with sqlite3.connect(folder / "best.search.db") as db:
        return [row[0] for row in db.execute("SELECT node FROM trials ORDER BY number")]
