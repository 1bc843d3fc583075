"""The SQLite store: the only module that talks to the database.

It keeps the apply journal (intent written before every mutation, outcome after), the per-program apply
lock (who holds it, since when, doing what), the history of applies, each program's status as the
controller last wrote it, the event log (morphs fired, applied, rolled back or skipped; reconcile
outcomes), and small named JSON documents (the rule engine's cooldowns, so a restart does not reset them).
WAL mode and one short transaction per write, so a process killed at any point leaves a consistent
database that the next run reads to resume or roll back.
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
CREATE INDEX IF NOT EXISTS applies_program ON applies(program, started);
CREATE TABLE IF NOT EXISTS status (
    program TEXT PRIMARY KEY,
    doc TEXT NOT NULL,          -- JSON, the shape is specs/formats.md's status document
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    program TEXT NOT NULL,
    vm TEXT,
    kind TEXT NOT NULL,         -- reconcile | morph | rollback | source | ...
    outcome TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT
);
CREATE INDEX IF NOT EXISTS events_program ON events(program, at);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    doc TEXT NOT NULL,
    updated REAL NOT NULL
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


@dataclass(frozen=True)
class ApplyRecord:
    id: str
    program: str
    revision: str | None
    started: float
    finished: float | None
    result: str | None  # ok | partial | interrupted | None while running
    summary: dict


@dataclass(frozen=True)
class Event:
    id: int
    at: float
    program: str
    vm: str | None
    kind: str
    outcome: str
    message: str
    data: dict | None


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
        with self._lock:
                self.db.execute("INSERT INTO applies (id, program, revision, started) VALUES (?,?,?,?)",
                            (apply_id, program, revision, time.time()))

    def end_apply(self, apply_id: str, result: str, summary: dict) -> None:
        with self._lock:
            self.db.execute("UPDATE applies SET finished=?, result=?, summary=? WHERE id=?",
                            (time.time(), result, json.dumps(summary, sort_keys=True, default=str), apply_id))

    def history(self, program: str | None = None, limit: int = 20) -> list[ApplyRecord]:
        """Applies, newest first. One that never finished (the process died) reads as `interrupted`."""
        q = "SELECT id, program, revision, started, finished, result, summary FROM applies"
        args: tuple = ()
        if program is not None:
            q += " WHERE program=?"
            args = (program,)
        rows = self.db.execute(q + " ORDER BY started DESC, rowid DESC LIMIT ?", (*args, limit)).fetchall()
        return [ApplyRecord(r[0], r[1], r[2], r[3], r[4], r[5] or (None if r[4] is None else "interrupted"),
                            json.loads(r[6]) if r[6] else {}) for r in rows]

    def interrupted_applies(self, program: str) -> None:
        """Mark applies that never finished (their process is gone) as interrupted."""
        with self._lock:
            self.db.execute("UPDATE applies SET finished=?, result='interrupted' WHERE program=? AND finished IS NULL",
                            (time.time(), program))

    # -- status
    def put_status(self, program: str, doc: dict) -> None:
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO status VALUES (?,?,?)",
                            (program, json.dumps(doc, sort_keys=True, default=str), time.time()))

    def get_status(self, program: str) -> dict | None:
        row = self.db.execute("SELECT doc FROM status WHERE program=?", (program,)).fetchone()
        return json.loads(row[0]) if row else None

    def all_status(self) -> dict[str, dict]:
        return {p: json.loads(d) for p, d in self.db.execute("SELECT program, doc FROM status ORDER BY program")}

    # -- events
    def add_event(self, program: str, vm: str | None, kind: str, outcome: str, message: str,
                  data: dict | None = None, at: float | None = None) -> int:
        with self._lock:
            cur = self.db.execute("INSERT INTO events (at, program, vm, kind, outcome, message, data) "
                                  "VALUES (?,?,?,?,?,?,?)",
                                  (time.time() if at is None else at, program, vm, kind, outcome, message,
                                   json.dumps(data, sort_keys=True, default=str) if data is not None else None))
            return int(cur.lastrowid)

    def events(self, program: str | None = None, vm: str | None = None, since: float | None = None,
               kind: str | None = None, limit: int = 100) -> list[Event]:
        """Events, newest first."""
        where, args = [], []
        for col, val in (("program", program), ("vm", vm), ("kind", kind)):
            if val is not None:
                where.append(f"{col}=?")
                args.append(val)
        if since is not None:
            where.append("at>=?")
            args.append(since)
        q = "SELECT id, at, program, vm, kind, outcome, message, data FROM events"
        if where:
            q += " WHERE " + " AND ".join(where)
        rows = self.db.execute(q + " ORDER BY at DESC, id DESC LIMIT ?", (*args, limit)).fetchall()
        return [Event(*r[:7], json.loads(r[7]) if r[7] else None) for r in rows]

    def event_counts(self, program: str, kind: str | None = None) -> dict[str, int]:
        q = "SELECT outcome, COUNT(*) FROM events WHERE program=?"
        args: list = [program]
        if kind is not None:
            q += " AND kind=?"
            args.append(kind)
        return dict(self.db.execute(q + " GROUP BY outcome", args).fetchall())

    # -- small named documents
    def put_doc(self, key: str, doc) -> None:
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO kv VALUES (?,?,?)",
                            (key, json.dumps(doc, sort_keys=True, default=str), time.time()))

    def get_doc(self, key: str, default=None):
        row = self.db.execute("SELECT doc FROM kv WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
