"""A search's state on disk: one SQLite file holding its settings and every evaluated candidate.

Tables: ``settings(key, value)`` — the search as JSON (plan text, ``--vary`` keys, strategy, seed, layer
granularity, eval command, budget); ``trials`` — one row per evaluated candidate: its number, batch, values
(JSON), plan (YAML), status (``ok``, ``invalid``, ``failed``), score, seconds, the node and host it ran on,
the message, and when it finished. A row is written (and committed) as each candidate finishes, in WAL
mode, so a reader — ``mergescope inspect SEARCH.db`` — sees the search while it runs, and an interrupted
search resumes from what is there: the strategy replays its batches from the seed and every candidate
already in the file is taken from it instead of being evaluated again. Cancelled candidates are not written.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from mergescope.checkpoints import MergescopeError

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    number INTEGER PRIMARY KEY, batch INTEGER NOT NULL, point TEXT NOT NULL, plan TEXT NOT NULL,
    status TEXT NOT NULL, score REAL, seconds REAL NOT NULL, node TEXT NOT NULL, host TEXT NOT NULL,
    message TEXT NOT NULL, finished REAL NOT NULL
);
"""
#: settings that may change between a search and its --resume (the rest must match)
RESUMABLE = frozenset({"budget", "output", "plan_path"})


@dataclass(frozen=True)
class Trial:
    """One stored candidate, as a reader sees it."""

    number: int
    batch: int
    point: list
    plan: str
    status: str
    score: float | None
    seconds: float
    node: str
    host: str
    message: str
    finished: float


def default_store_path(best_path: Path) -> Path:
    """``plan.best.yml`` → ``plan.best.search.db`` beside it."""
    return best_path.with_name(f"{best_path.stem}.search.db")


def _connect(path: Path) -> sqlite3.Connection:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, timeout=30)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.executescript(SCHEMA)
    except (sqlite3.Error, OSError) as exc:
        raise MergescopeError(f"{path}: cannot open the search file: {exc}") from None
    return connection


class SearchStore:
    """The writer's side: settings checked on resume, trials recorded as they finish."""

    def __init__(self, path: Path, settings: dict, *, resume: bool):
        self.path = path
        existing = path.exists()
        if existing and not resume:
            raise MergescopeError(f"{path}: a search file is already there; continue it with --resume, "
                                  "or remove it (or pick another -o) to start afresh")
        if resume and not existing:
            raise MergescopeError(f"{path}: no search file to resume; run without --resume to start one")
        self._db = _connect(path)
        stored = read_settings(self._db)
        if resume:
            _check_same(path, stored, settings)
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO settings VALUES (?, ?)",
                                 [(k, json.dumps(v)) for k, v in settings.items()])

    def trials(self) -> dict[int, Trial]:
        return {t.number: t for t in read_trials(self._db)}

    def record(self, number: int, batch: int, point: tuple, plan: str, status: str, score: float | None,
               seconds: float, node: str, host: str, message: str) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO trials VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (number, batch, json.dumps(list(point)), plan, status, score, seconds, node, host, message,
                 time.time()),
            )

    def close(self) -> None:
        self._db.close()


def _check_same(path: Path, stored: dict, settings: dict) -> None:
    for key in sorted(set(stored) | set(settings)):
        if key not in RESUMABLE and stored.get(key) != settings.get(key):
            raise MergescopeError(
                f"{path}: this search was started with other settings ({key} differs); --resume needs the same "
                "plan, --vary, strategy, seed, layer granularity and eval command"
            )


def read_settings(db: sqlite3.Connection) -> dict:
    return {key: json.loads(value) for key, value in db.execute("SELECT key, value FROM settings")}


def read_trials(db: sqlite3.Connection) -> list[Trial]:
    """Every stored trial in the order they finished."""
    rows = db.execute("SELECT number, batch, point, plan, status, score, seconds, node, host, message, finished "
                      "FROM trials ORDER BY finished, number")
    return [Trial(r[0], r[1], json.loads(r[2]), *r[3:]) for r in rows]


def open_for_reading(path: str | Path) -> tuple[dict, list[Trial]]:
    """A search file's settings and trials (a one-line error for a file that is not one)."""
    path = Path(path)
    if not path.is_file():
        raise MergescopeError(f"{path}: no such search file")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            return read_settings(db), read_trials(db)
        finally:
            db.close()
    except (sqlite3.Error, json.JSONDecodeError, TypeError) as exc:
        raise MergescopeError(f"{path}: not a mergescope search file ({exc})") from None


def best_so_far(trials: list[Trial]) -> list[float]:
    """The best score after each scored trial, in the order they finished (the search's progress curve)."""
    curve: list[float] = []
    for trial in trials:
        if trial.status == "ok" and trial.score is not None:
            curve.append(trial.score if not curve else max(curve[-1], trial.score))
    return curve


def best_trial(trials: list[Trial]) -> Trial | None:
    """The highest-scoring trial (ties: the lower number); None before any was scored."""
    scored = [t for t in trials if t.status == "ok" and t.score is not None]
    return min(scored, key=lambda t: (-t.score, t.number)) if scored else None
