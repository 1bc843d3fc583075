"""The SQLite store: the only module that talks to the database.

It keeps the apply journal (intent written before every mutation, outcome after), the per-program apply
lock (who holds it, since when, doing what), and the history of applies. WAL mode and one short
transaction per write, so a process killed at any point leaves a consistent database that the next run
reads to resume or roll back.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    id INTEGER PRIMARY KEY,
    apply_id TEXT NOT NULL,
    address TEXT NOT NULL,
    op TEXT NOT NULL,
    snapshot TEXT,
    before TEXT,
    status TEXT NOT NULL,       -- intent | done | undone | failed
    detail TEXT,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS journal_status ON journal(status);
CREATE TABLE IF NOT EXISTS locks (
    program TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    since REAL NOT NULL,
    what TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS applies (
    id TEXT PRIMARY KEY,
    program TEXT NOT NULL,
    revision TEXT,
    started REAL NOT NULL,
    finished REAL,
    result TEXT,
    summary TEXT
);
"""


@dataclass(frozen=True)
class JournalEntry:
    id: int
    apply_id: str
    address: str
    op: str
    snapshot: str | None
    before: str | None
    status: str
    detail: str | None


@dataclass(frozen=True)
class LockInfo:
    program: str
    holder: str
    pid: int
    host: str
    since: float
    what: str

    def describe(self) -> str:
        age = time.time() - self.since
        return f"held by {self.holder} (pid {self.pid} on {self.host}) for {age:.0f}s: {self.what}"


class LockHeld(Exception):
    def __init__(self, info: LockInfo) -> None:
        super().__init__(f"another apply of `{info.program}` is running: {info.describe()}")
        self.info = info


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by apply's worker threads; every statement is serialised by `_lock`.
        self.db = sqlite3.connect(str(path), isolation_level=None, timeout=30, check_same_thread=False)
        self._lock = threading.RLock()
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- lock
    def acquire(self, program: str, holder: str, what: str, timeout: float = 0.0) -> None:
        """Take the program's apply lock, waiting up to `timeout` seconds. A lock whose process is gone
        (same host, no such pid) is stale and taken over."""
        deadline = time.monotonic() + timeout
        host = socket.gethostname()
        while True:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                row = self.db.execute("SELECT program, holder, pid, host, since, what FROM locks WHERE program=?",
                                      (program,)).fetchone()
                if row is None or (row[3] == host and not _alive(row[2])):
                    self.db.execute("INSERT OR REPLACE INTO locks VALUES (?,?,?,?,?,?)",
                                    (program, holder, os.getpid(), host, time.time(), what))
                    self.db.execute("COMMIT")
                    return
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            if time.monotonic() >= deadline:
                raise LockHeld(LockInfo(*row))
            time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))

    def release(self, program: str) -> None:
        self.db.execute("DELETE FROM locks WHERE program=? AND pid=?", (program, os.getpid()))

    def lock_info(self, program: str) -> LockInfo | None:
        row = self.db.execute("SELECT program, holder, pid, host, since, what FROM locks WHERE program=?",
                              (program,)).fetchone()
        return LockInfo(*row) if row else None

    # -- journal
    def intent(self, apply_id: str, address: str, op: str, snapshot: str | None, before: str | None) -> int:
        with self._lock:
            cur = self.db.execute("INSERT INTO journal (apply_id, address, op, snapshot, before, status, at) "
                                  "VALUES (?,?,?,?,?, 'intent', ?)",
                                  (apply_id, address, op, snapshot, before, time.time()))
            return int(cur.lastrowid)

    def settle(self, entry_id: int, status: str, detail: str | None = None) -> None:
        with self._lock:
            self.db.execute("UPDATE journal SET status=?, detail=?, at=? WHERE id=?", (status, detail, time.time(), entry_id))

    def unfinished(self) -> list[JournalEntry]:
        rows = self.db.execute("SELECT id, apply_id, address, op, snapshot, before, status, detail FROM journal "
                               "WHERE status='intent' ORDER BY id DESC").fetchall()
        return [JournalEntry(*r) for r in rows]

    # -- history
    def begin_apply(self, apply_id: str, program: str, revision: str | None) -> None:
        self.db.execute("INSERT INTO applies (id, program, revision, started) VALUES (?,?,?,?)",
                        (apply_id, program, revision, time.time()))

    def end_apply(self, apply_id: str, result: str, summary: dict) -> None:
        self.db.execute("UPDATE applies SET finished=?, result=?, summary=? WHERE id=?",
                        (time.time(), result, json.dumps(summary, sort_keys=True), apply_id))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
