"""On-disk cache of analysis reports, so reopening the same models is instant.

Reports live in one SQLite file under the user cache folder (``$MERGESCOPE_CACHE_DIR``, else
``$XDG_CACHE_HOME/mergescope``, else ``~/.cache/mergescope``), keyed by the checkpoints' fingerprints
(every weight file's path, size and modification time), the model names and the density. Rewriting a
checkpoint changes its fingerprint, so a stale report is never served. A cache that cannot be opened or
written is skipped silently: it is an optimisation, never a reason to fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from mergescope.checkpoints import Checkpoint

#: bump when the statistics or the report shape change, to invalidate every cached report
CACHE_VERSION = "analysis-2"  # 2: embeddings and heads compared by token string across vocabularies


def cache_dir() -> Path:
    explicit = os.environ.get("MERGESCOPE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "mergescope"


def cache_key(base: Checkpoint, models: list[Checkpoint], names: list[str], density: float) -> str:
    # the tokenizers decide which rows are compared (analysis.vocabulary_rows), so they are part of the key
    parts = [CACHE_VERSION, base.fingerprint, str(base.tokenizer_fingerprint), base.name, repr(float(density))]
    parts += [f"{name}|{m.source}|{m.fingerprint}|{m.tokenizer_fingerprint}" for name, m in zip(names, models)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


class AnalysisCache:
    def __init__(self, path: Path | None = None):
        self.path = path or cache_dir() / "analysis.sqlite"

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=5)
        connection.execute("CREATE TABLE IF NOT EXISTS reports (key TEXT PRIMARY KEY, created REAL, report TEXT)")
        return connection

    def get(self, key: str) -> dict | None:
        try:
            with closing(self._connect()) as connection:
                row = connection.execute("SELECT report FROM reports WHERE key = ?", (key,)).fetchone()
        except (sqlite3.Error, OSError):
            return None
        if row is None:
            return None
        try:
            return json.loads(row[0])
        except json.JSONDecodeError:
            return None

    def put(self, key: str, report: dict) -> None:
        try:
            with closing(self._connect()) as connection, connection:
                connection.execute(
                    "INSERT OR REPLACE INTO reports VALUES (?, ?, ?)", (key, time.time(), json.dumps(report))
                )
        except (sqlite3.Error, OSError):
            pass
