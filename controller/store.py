"""The SQLite store: the only module that talks to the database.

It keeps the apply journal (intent written before every mutation, outcome after), the per-program apply
lock (who holds it, since when, doing what), the history of applies, each program's status as the
controller last wrote it, the event log (morphs fired, applied, rolled back or skipped; reconcile
outcomes), and small named JSON documents (the rule engine's cooldowns, so a restart does not reset them).
WAL mode and one short transaction per write, so a process killed at any point leaves a consistent
database that the next run reads to resume or roll back.

`Series`, in a file of its own, is the monitor's time-series store: raw samples for a day, five-minute
rollups for a month, the last hour in memory for the rule engine (specs/monitoring.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


# ------------------------------------------------------------------------------------------ time series
#
# `Series` keeps the monitor's samples in a database of its own (`<state-dir>/series.db`), laid out for
# thousands of VMs sampled every few seconds; specs/monitoring.md describes the layout and its sizes.

# Metric names as conditions write them (`disk.read`) → as the store keeps them (`disk_read`).
METRIC_ALIASES = {"disk.read": "disk_read", "disk.write": "disk_write", "net.rx": "net_rx", "net.tx": "net_tx"}
APP_PREFIX = "app:"  # application states are kept as a metric per application: 1 running, 0 stopped, -1 unknown
RAW_SECONDS = 24 * 3600.0
ROLLUP_SECONDS = 30 * 24 * 3600.0
BUCKET_SECONDS = 300.0
RECENT_SECONDS = 3600.0
# A rollup keeps these quantiles of its bucket, each as a byte between the bucket's min (0) and max (255).
KNOT_LEVELS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
ROLLUP_DTYPE = np.dtype([("count", "<u2"), ("sum", "<f4"), ("min", "<f4"), ("max", "<f4"),
                         ("knots", "u1", (len(KNOT_LEVELS),))])
_F4, _F8, _I4 = np.dtype("<f4"), np.dtype("<f8"), np.dtype("<i4")

SERIES_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value REAL NOT NULL);
CREATE TABLE IF NOT EXISTS vms (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS metrics (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
-- a sorted set of VM ids (int32), shared by every row that holds values for exactly these VMs
CREATE TABLE IF NOT EXISTS vmsets (id INTEGER PRIMARY KEY, digest BLOB NOT NULL UNIQUE, ids BLOB NOT NULL);
-- one row per (metric, round) of the bucket still open: float32 values in vmset order
CREATE TABLE IF NOT EXISTS pending (metric INTEGER NOT NULL, t REAL NOT NULL, vmset INTEGER NOT NULL,
                                    data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS pending_metric ON pending(metric, t);
-- one row per (metric, closed bucket): round times (float64 × n) and a float32 matrix, one VM after another
CREATE TABLE IF NOT EXISTS blocks (id INTEGER PRIMARY KEY, metric INTEGER NOT NULL, bucket REAL NOT NULL,
                                   t_first REAL NOT NULL, t_last REAL NOT NULL, vmset INTEGER NOT NULL,
                                   n INTEGER NOT NULL, times BLOB NOT NULL, data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS blocks_metric ON blocks(metric, bucket);
-- one row per block: a ROLLUP_DTYPE record per VM, in vmset order
CREATE TABLE IF NOT EXISTS rollups (id INTEGER PRIMARY KEY, metric INTEGER NOT NULL, bucket REAL NOT NULL,
                                    vmset INTEGER NOT NULL, data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS rollups_metric ON rollups(metric, bucket);
"""


SERIES_FILE = "series.db"


def series_path(state_dir: Path) -> Path:
    """Where a state folder keeps its time series: a file of its own, beside the journal's."""
    return state_dir / SERIES_FILE


@dataclass(frozen=True)
class RetentionResult:
    blocks_deleted: int
    rollups_deleted: int
    raw_floor: float  # raw samples are complete from here on
    rollup_floor: float  # rollups are complete from here on


class _RecentMetric:
    """One metric's recent rounds: a slot per round, a column per VM that reported it."""

    __slots__ = ("times", "vals", "slot_of", "lut", "ncols", "order", "order_version")

    def __init__(self) -> None:
        self.times = np.full(16, np.nan)
        self.vals = np.full((16, 16), np.nan, dtype=_F4)
        self.slot_of: dict[float, int] = {}
        self.lut = np.full(16, -1, dtype=np.int64)  # VM id -> column, -1 for none
        self.ncols = 0
        self.order = np.empty(0, dtype=np.int64)
        self.order_version = -1

    def columns(self, ids: np.ndarray) -> np.ndarray:
        top = int(ids.max()) + 1
        if top > len(self.lut):
            self.lut = np.concatenate([self.lut, np.full(max(top, len(self.lut) * 5 // 4) - len(self.lut) + 16,
                                                         -1, dtype=np.int64)])
        cols = self.lut[ids]
        new = cols < 0
        if new.any():
            fresh = ids[new]
            self.lut[fresh] = np.arange(self.ncols, self.ncols + len(fresh))
            self.ncols += len(fresh)
            if self.ncols > self.vals.shape[1]:
                grown = np.full((self.vals.shape[0], self.ncols * 5 // 4 + 16), np.nan, dtype=_F4)
                grown[:, :self.vals.shape[1]] = self.vals
                self.vals = grown
            cols = self.lut[ids]
        return cols

    def slot(self, t: float) -> int:
        s = self.slot_of.get(t)
        if s is not None:
            return s
        free = np.flatnonzero(np.isnan(self.times))
        if len(free) == 0:
            n = len(self.times)
            self.times = np.concatenate([self.times, np.full(n // 2 + 8, np.nan)])
            grown = np.full((len(self.times), self.vals.shape[1]), np.nan, dtype=_F4)
            grown[:n] = self.vals
            self.vals = grown
            s = n
        else:
            s = int(free[0])
        self.times[s] = t
        self.slot_of[t] = s
        return s

    def evict(self, upto: float) -> None:
        old = np.flatnonzero(self.times <= upto)
        for s in old.tolist():
            del self.slot_of[float(self.times[s])]
        self.times[old] = np.nan
        self.vals[old] = np.nan


class _Recent:
    """The last `seconds` of samples in memory, so a round's window queries (one per VM and metric) are
    array slices rather than database reads. It holds every stored sample newer than `complete_after`;
    a query reaching further back goes to the database."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.complete_after = -math.inf
        self.newest = -math.inf
        self.metrics: dict[int, _RecentMetric] = {}
        self.version = 0
        self._selections: dict[tuple[int, float, float], tuple[np.ndarray, list[float]]] = {}

    def add(self, metric: int, t: float, ids: np.ndarray, vals: np.ndarray) -> None:
        if t <= self.complete_after:
            return
        m = self.metrics.get(metric)
        if m is None:
            m = self.metrics[metric] = _RecentMetric()
        cols = m.columns(ids)
        slot = m.slot(t)  # may grow `m.vals`: take the slot before indexing it
        m.vals[slot, cols] = vals
        self.version += 1
        self.newest = max(self.newest, t)

    def trim(self) -> None:
        limit = self.newest - self.seconds
        if limit > self.complete_after:
            self.complete_after = limit
            for m in self.metrics.values():
                m.evict(limit)
        self._selections.clear()

    def covers(self, start: float) -> bool:
        return start > self.complete_after

    def window(self, metric: int, vm: int, start: float, end: float) -> list[tuple[float, float]]:
        m = self.metrics.get(metric)
        if m is None or vm >= len(m.lut) or m.lut[vm] < 0:
            return []
        key = (metric, start, end)
        sel = self._selections.get(key)
        if sel is None:
            if m.order_version != self.version:
                m.order = np.argsort(m.times, kind="stable")[: len(m.slot_of)]
                m.order_version = self.version
            ts = m.times[m.order]
            slots = m.order[(ts >= start) & (ts <= end)]
            sel = self._selections[key] = (slots, m.times[slots].tolist())
        slots, times = sel
        values = m.vals[slots, m.lut[vm]].tolist()
        return [(t, v) for t, v in zip(times, values) if v == v]  # NaN (no sample) is the one v != v

    def compact(self) -> None:
        """Drop the columns of VMs with nothing left in the window (VMs that went away)."""
        for key, m in list(self.metrics.items()):
            live = ~np.all(np.isnan(m.vals[:, :m.ncols]), axis=0)
            if live.all():
                continue
            if not live.any() and not m.slot_of:
                del self.metrics[key]
                continue
            keep = np.flatnonzero(live)
            vals = np.full((m.vals.shape[0], len(keep) + 16), np.nan, dtype=_F4)
            vals[:, :len(keep)] = m.vals[:, keep]
            remap = np.full(m.ncols, -1, dtype=np.int64)
            remap[keep] = np.arange(len(keep))
            has = m.lut >= 0
            m.lut[has] = remap[m.lut[has]]
            m.vals, m.ncols = vals, len(keep)
        self.version += 1
        self._selections.clear()


class _Open:
    """A bucket still being filled: its rounds, each possibly appended in several pieces."""

    __slots__ = ("rounds",)

    def __init__(self) -> None:
        self.rounds: dict[float, list[tuple[np.ndarray, np.ndarray]]] = {}

    def matrix(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(times, sorted VM ids, values[vm, round]) with NaN where a VM has no value in a round; a later
        piece wins over an earlier one for the same VM and round."""
        times = np.array(sorted(self.rounds), dtype=_F8)
        ids = np.unique(np.concatenate([i for pieces in self.rounds.values() for i, _ in pieces]))
        data = np.full((len(ids), len(times)), np.nan, dtype=_F4)
        for j, t in enumerate(times.tolist()):
            for piece_ids, vals in self.rounds[t]:
                data[np.searchsorted(ids, piece_ids), j] = vals
        return times, ids, data


def rollup(data: np.ndarray) -> np.ndarray:
    """One ROLLUP_DTYPE record per row of `data` (NaN = no sample): count, sum, min, max, and the quantiles
    at KNOT_LEVELS (numpy's `hazen` method), each encoded as a byte between min and max."""
    n = data.shape[0]
    out = np.zeros(n, dtype=ROLLUP_DTYPE)
    if n == 0 or data.shape[1] == 0:
        return out
    srt = np.sort(data, axis=1)  # NaN sorts last
    count = np.sum(~np.isnan(data), axis=1)
    has = count > 0
    c = np.maximum(count, 1)
    out["count"] = count
    out["sum"] = np.nansum(data, axis=1, dtype=np.float64)
    lo = srt[:, 0]
    hi = srt[np.arange(n), c - 1]
    out["min"] = np.where(has, lo, 0)
    out["max"] = np.where(has, hi, 0)
    span = np.where(hi > lo, hi - lo, 1).astype(np.float64)
    for k, q in enumerate(KNOT_LEVELS):
        # Hazen's plotting positions: the i-th of c sorted samples stands at level (i - 0.5) / c, so the
        # top and bottom sample carry half a sample's weight beyond them. Numpy's default (min at level 0,
        # max at 1) would give a bucket of few samples too narrow a spread, and mixing many such buckets
        # would pull the upper percentiles down.
        pos = np.clip(c * q - 0.5, 0, c - 1)
        i = np.floor(pos).astype(np.int64)
        j = np.minimum(i + 1, c - 1)
        frac = pos - i
        a, b = srt[np.arange(n), i].astype(np.float64), srt[np.arange(n), j].astype(np.float64)
        value = a + (b - a) * frac
        code = np.rint((value - lo) / span * 255)
        out["knots"][:, k] = np.clip(np.where(has & (hi > lo), code, 0), 0, 255)
    return out


def _mixture_quantile(records: np.ndarray, points: np.ndarray, p: float) -> float:
    """The `p`-th percentile (0..100) of a mixture: each rollup record stands for `count` samples, half a
    sample at its min and at its max (as Hazen's positions put them) and the rest spread linearly between
    its knots (min, the KNOT_LEVELS quantiles, max); each point stands for one sample. Found by bisection on
    the mixture's distribution function."""
    total = float(records["count"].sum()) + len(points)
    lo = min(float(records["min"].min()) if len(records) else math.inf, float(points.min()) if len(points) else math.inf)
    hi = max(float(records["max"].max()) if len(records) else -math.inf, float(points.max()) if len(points) else -math.inf)
    if p <= 0:
        return lo
    if p >= 100 or lo == hi:
        return hi
    mn = records["min"].astype(np.float64)
    span = records["max"].astype(np.float64) - mn
    knots = np.column_stack([mn, mn[:, None] + records["knots"].astype(np.float64) / 255 * span[:, None],
                             records["max"].astype(np.float64)])
    weight = records["count"].astype(np.float64)
    edge = 0.5 / np.maximum(weight, 1)
    levels = np.clip(np.tile(np.array((0.0, *KNOT_LEVELS, 1.0)), (len(records), 1)), edge[:, None], 1 - edge[:, None])
    rows = np.arange(len(records))

    def below(x: float) -> float:  # how many samples are <= x
        j = np.sum(knots <= x, axis=1)
        inside = (j > 0) & (j < knots.shape[1])
        f = np.where(j >= knots.shape[1], 1.0, 0.0)
        if inside.any():
            jj = j[inside]
            r = rows[inside]
            k0, k1 = knots[r, jj - 1], knots[r, jj]
            f[inside] = levels[r, jj - 1] + (x - k0) / (k1 - k0) * (levels[r, jj] - levels[r, jj - 1])
        return float(np.dot(f, weight)) + float(np.count_nonzero(points <= x))

    want = p / 100 * total
    for _ in range(60):
        mid = (lo + hi) / 2
        if below(mid) >= want:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-9 * max(1.0, abs(hi)):
            break
    return hi


class Series:
    """The time-series store: samples in, windows and aggregates out. The rule engine reads it through
    `window` and `app` (controller/rules.py's `Series` protocol).

    Samples are (vm, metric, t, value) tuples; every sample with the same `t` and metric is one round. Raw
    samples are kept `raw_seconds` (24 h) and summarised per `bucket_seconds` (5 min) into rollups kept
    `rollup_seconds` (30 days); `retention(now)` drops what is older. Values are float32. Not for several
    processes at once: each keeps its own view of the open bucket."""

    def __init__(self, path: Path, *, raw_seconds: float = RAW_SECONDS, rollup_seconds: float = ROLLUP_SECONDS,
                 bucket_seconds: float = BUCKET_SECONDS, recent_seconds: float = RECENT_SECONDS) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None, timeout=30, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SERIES_SCHEMA)
        self._lock = threading.RLock()
        meta = dict(self.db.execute("SELECT key, value FROM meta"))
        self.raw_seconds = raw_seconds
        self.rollup_seconds = rollup_seconds
        # The bucket size is fixed when the file is made: blocks and rollups already written use it.
        self.bucket = float(meta.get("bucket_seconds", bucket_seconds))
        self.raw_floor = float(meta.get("raw_floor", -math.inf))
        self.rollup_floor = float(meta.get("rollup_floor", -math.inf))
        if "bucket_seconds" not in meta:
            self.db.execute("INSERT INTO meta VALUES ('bucket_seconds', ?)", (self.bucket,))
        self._vm_ids: dict[str, int] = {}
        self._metric_ids: dict[str, int] = {}
        self._digests: dict[bytes, int] = {}
        self._vmsets: dict[int, np.ndarray] = {}
        self._open: dict[int, dict[float, _Open]] = {}
        self._newest: dict[int, float] = {}
        self._recent = _Recent(recent_seconds)
        self._reload()

    def close(self) -> None:
        """Close the file. The open bucket stays in `pending` and is picked up by the next `Series`."""
        with self._lock:
            self.db.close()

    def __enter__(self) -> Series:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- ids
    def _vm_id(self, name: str) -> int:
        i = self._vm_ids.get(name)
        if i is None:
            i = self._vm_ids[name] = int(self.db.execute("INSERT INTO vms (name) VALUES (?)", (name,)).lastrowid)
        return i

    def _metric_id(self, name: str, create: bool = False) -> int | None:
        name = METRIC_ALIASES.get(name, name)
        i = self._metric_ids.get(name)
        if i is None and create:
            i = self._metric_ids[name] = int(self.db.execute("INSERT INTO metrics (name) VALUES (?)",
                                                             (name,)).lastrowid)
        return i

    def _vmset_id(self, ids: np.ndarray) -> int:
        raw = ids.astype(_I4).tobytes()
        digest = hashlib.blake2b(raw, digest_size=16).digest()
        i = self._digests.get(digest)
        if i is None:
            i = self._digests[digest] = int(self.db.execute("INSERT INTO vmsets (digest, ids) VALUES (?, ?)",
                                                            (digest, raw)).lastrowid)
            self._vmsets[i] = ids.astype(_I4)
        return i

    def _vmset(self, i: int) -> np.ndarray:
        ids = self._vmsets.get(i)
        if ids is None:
            if len(self._vmsets) > 256:  # a fleet that changes often leaves many sets behind
                self._vmsets.clear()
            row = self.db.execute("SELECT ids FROM vmsets WHERE id=?", (i,)).fetchone()
            ids = self._vmsets[i] = np.frombuffer(row[0], dtype=_I4) if row else np.empty(0, dtype=_I4)
        return ids

    def _position(self, vmset: int, vm: int) -> int | None:
        ids = self._vmset(vmset)
        k = int(np.searchsorted(ids, vm))
        return k if k < len(ids) and ids[k] == vm else None

    # -- writing
    def append(self, samples: Iterable[tuple[str, str, float, float]]) -> int:
        """Store samples (vm, metric, t, value); returns how many were kept (non-finite values are not).
        One transaction, whatever the number of samples; a bucket that the new samples close is written
        as a block with its rollup in the same transaction."""
        groups: dict[tuple[float, str], tuple[list[str], list[float]]] = {}
        for vm, metric, t, value in samples:
            key = (t, metric)
            g = groups.get(key)
            if g is None:
                g = groups[key] = ([], [])
            g[0].append(vm)
            g[1].append(value)
        if not groups:
            return 0
        kept = 0
        with self._lock:
            self.db.execute("BEGIN")
            try:
                rows = []
                touched: set[int] = set()
                for (t, metric), (names, values) in groups.items():
                    t = float(t)
                    vals = np.asarray(values, dtype=np.float64)
                    ok = np.isfinite(vals)
                    if not ok.all():
                        names = [n for n, good in zip(names, ok.tolist()) if good]
                        vals = vals[ok]
                    if not len(names):
                        continue
                    ids = np.fromiter((self._vm_id(n) for n in names), dtype=np.int64, count=len(names))
                    # Sorted, one value per VM (the last given wins).
                    rev_ids, first = np.unique(ids[::-1], return_index=True)
                    ids, vals = rev_ids, vals[::-1][first].astype(_F4)
                    m = self._metric_id(metric, create=True)
                    vmset = self._vmset_id(ids)
                    rows.append((m, t, vmset, vals.tobytes()))
                    bucket = math.floor(t / self.bucket) * self.bucket
                    self._open.setdefault(m, {}).setdefault(bucket, _Open()).rounds.setdefault(t, []).append((ids, vals))
                    self._recent.add(m, t, ids, vals)
                    if t > self._newest.get(m, -math.inf):
                        self._newest[m] = t
                    touched.add(m)
                    kept += len(ids)
                self.db.executemany("INSERT INTO pending (metric, t, vmset, data) VALUES (?,?,?,?)", rows)
                for m in touched:
                    self._close_buckets(m, self._newest[m])
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                self._reload()
                raise
            self._recent.trim()
        return kept

    def _close_buckets(self, metric: int, now: float) -> None:
        """Write every open bucket of `metric` that ends at or before `now` as a block and its rollup."""
        buckets = self._open.get(metric, {})
        for bucket in sorted(b for b in buckets if b + self.bucket <= now):
            times, ids, data = buckets.pop(bucket).matrix()
            vmset = self._vmset_id(ids)
            self.db.execute("INSERT INTO blocks (metric, bucket, t_first, t_last, vmset, n, times, data) "
                            "VALUES (?,?,?,?,?,?,?,?)",
                            (metric, bucket, float(times[0]), float(times[-1]), vmset, len(times),
                             times.tobytes(), data.tobytes()))
            summary = rollup(data)
            has = summary["count"] > 0
            if has.any():
                self.db.execute("INSERT INTO rollups (metric, bucket, vmset, data) VALUES (?,?,?,?)",
                                (metric, bucket, self._vmset_id(ids[has]) if not has.all() else vmset,
                                 summary[has].tobytes()))
            self.db.execute("DELETE FROM pending WHERE metric=? AND t>=? AND t<?",
                            (metric, bucket, bucket + self.bucket))

    def _reload(self) -> None:
        """Rebuild what is kept in memory from the file: the open buckets (from `pending`) and the recent
        window (from blocks and `pending`), and the names' ids."""
        self._vm_ids = dict(self.db.execute("SELECT name, id FROM vms"))
        self._metric_ids = dict(self.db.execute("SELECT name, id FROM metrics"))
        self._digests = dict(self.db.execute("SELECT digest, id FROM vmsets"))
        self._vmsets.clear()
        self._open.clear()
        self._newest.clear()
        self._recent = _Recent(self._recent.seconds)
        for m, t, vmset, data in self.db.execute("SELECT metric, t, vmset, data FROM pending ORDER BY rowid"):
            ids = self._vmset(vmset).astype(np.int64)
            vals = np.frombuffer(data, dtype=_F4)
            bucket = math.floor(t / self.bucket) * self.bucket
            self._open.setdefault(m, {}).setdefault(bucket, _Open()).rounds.setdefault(t, []).append((ids, vals))
            self._newest[m] = max(self._newest.get(m, -math.inf), t)
        for m, (t,) in ((m, self.db.execute("SELECT max(t_last) FROM blocks WHERE metric=?", (m,)).fetchone())
                        for m in self._metric_ids.values()):
            if t is not None:
                self._newest[m] = max(self._newest.get(m, -math.inf), t)
        if not self._newest:
            return
        newest = max(self._newest.values())
        start = newest - self._recent.seconds
        for m in self._metric_ids.values():
            for t, ids, vals in self._db_rounds(m, start, newest):
                self._recent.add(m, t, ids, vals)
        self._recent.complete_after = start
        self._recent.newest = newest
        self._recent.trim()

    def _db_rounds(self, metric: int, start: float, end: float):
        """Every (t, ids, values) round of `metric` with start < t <= end, blocks and open buckets alike."""
        for times, vmset, data in self.db.execute(
                "SELECT times, vmset, data FROM blocks WHERE metric=? AND t_last>? AND t_first<=? ORDER BY bucket, id",
                (metric, start, end)):
            ts = np.frombuffer(times, dtype=_F8)
            ids = self._vmset(vmset).astype(np.int64)
            mat = np.frombuffer(data, dtype=_F4).reshape(len(ids), len(ts))
            for j, t in enumerate(ts.tolist()):
                if start < t <= end:
                    has = ~np.isnan(mat[:, j])
                    yield t, ids[has], mat[has, j]
        for bucket, block in sorted(self._open.get(metric, {}).items()):
            for t in sorted(block.rounds):
                if start < t <= end:
                    for ids, vals in block.rounds[t]:
                        yield t, ids, vals

    # -- reading
    def window(self, vm: str, metric: str, start: float, end: float) -> list[tuple[float, float]]:
        """The samples (t, value) of one VM's metric with start <= t <= end, oldest first."""
        with self._lock:
            vid, m = self._vm_ids.get(vm), self._metric_id(metric)
            if vid is None or m is None or end < start:
                return []
            if self._recent.covers(start):
                return self._recent.window(m, vid, start, end)
            return self._db_window(vid, m, start, end)

    def _db_window(self, vm: int, metric: int, start: float, end: float) -> list[tuple[float, float]]:
        """From the file's blocks (a slice of each, by incremental blob I/O) and the open buckets."""
        out: list[tuple[float, float]] = []
        for bid, vmset, n, times in self.db.execute(
                "SELECT id, vmset, n, times FROM blocks WHERE metric=? AND bucket>? AND bucket<=? "
                "AND t_last>=? AND t_first<=? ORDER BY bucket, id", (metric, start - self.bucket, end, start, end)):
            k = self._position(vmset, vm)
            if k is None:
                continue
            with self.db.blobopen("blocks", "data", bid, readonly=True) as blob:
                blob.seek(k * n * 4)
                values = np.frombuffer(blob.read(n * 4), dtype=_F4).tolist()
            out.extend((t, v) for t, v in zip(np.frombuffer(times, dtype=_F8).tolist(), values)
                       if v == v and start <= t <= end)
        out += self._open_window(vm, metric, start, end)
        out.sort(key=lambda s: s[0])  # stable: of two values at one time, the later written stays last
        return [s for i, s in enumerate(out) if i + 1 == len(out) or out[i + 1][0] != s[0]]

    def _open_window(self, vm: int, metric: int, start: float, end: float) -> list[tuple[float, float]]:
        out: list[tuple[float, float]] = []
        for bucket, block in self._open.get(metric, {}).items():
            if bucket + self.bucket <= start or bucket > end:
                continue
            for t, pieces in block.rounds.items():
                if start <= t <= end:
                    for ids, vals in pieces:
                        k = int(np.searchsorted(ids, vm))
                        if k < len(ids) and ids[k] == vm:
                            out.append((t, float(vals[k])))
        return out

    def latest(self, vm: str, metric: str, since: float = -math.inf) -> tuple[float, float] | None:
        """The newest sample of a VM's metric at or after `since`, or None."""
        with self._lock:
            vid, m = self._vm_ids.get(vm), self._metric_id(metric)
            end = self._newest.get(m) if m is not None else None
            if vid is None or end is None:
                return None
            # The recent window holds everything newer than what only the file has.
            got = self._recent.window(m, vid, since, end)
            if not got and not self._recent.covers(since):
                got = self._db_window(vid, m, since, self._recent.complete_after)
            return got[-1] if got else None

    def app(self, vm: str, name: str) -> str | None:
        """An application's state in a VM as last sampled: "running", "stopped", or None (never sampled,
        or the guest agent did not answer)."""
        got = self.latest(vm, APP_PREFIX + name)
        if got is None or got[1] < 0:
            return None
        return "running" if got[1] >= 0.5 else "stopped"

    # -- aggregates
    def avg(self, vm: str, metric: str, start: float, end: float) -> float | None:
        raw, records = self._summary(vm, metric, start, end)
        n = len(raw) + int(records["count"].sum())
        return (float(raw.sum()) + float(records["sum"].astype(np.float64).sum())) / n if n else None

    def max(self, vm: str, metric: str, start: float, end: float) -> float | None:
        raw, records = self._summary(vm, metric, start, end)
        parts = [float(raw.max())] if len(raw) else []
        parts += [float(records["max"].max())] if len(records) else []
        return max(parts) if parts else None

    def min(self, vm: str, metric: str, start: float, end: float) -> float | None:
        raw, records = self._summary(vm, metric, start, end)
        parts = [float(raw.min())] if len(raw) else []
        parts += [float(records["min"].min())] if len(records) else []
        return min(parts) if parts else None

    def percentile(self, vm: str, metric: str, start: float, end: float, p: float) -> float | None:
        """The p-th percentile (0..100). Exact (linear interpolation, as numpy's) over raw samples; over
        rollups approximate, see `_mixture_quantile` and specs/monitoring.md."""
        raw, records = self._summary(vm, metric, start, end)
        if not len(records):
            return float(np.percentile(raw.astype(np.float64), p)) if len(raw) else None
        return _mixture_quantile(records, raw.astype(np.float64), p)

    def _summary(self, vm: str, metric: str, start: float, end: float) -> tuple[np.ndarray, np.ndarray]:
        """What an aggregate is computed from: raw values when raw samples still cover `start`, else the
        rollups of every bucket overlapping [start, end] plus the raw values of buckets not yet rolled up."""
        empty = np.empty(0, dtype=ROLLUP_DTYPE)
        with self._lock:
            if start >= self.raw_floor:
                return np.array([v for _, v in self.window(vm, metric, start, end)], dtype=np.float64), empty
            vid, m = self._vm_ids.get(vm), self._metric_id(metric)
            if vid is None or m is None:
                return np.empty(0), empty
            parts = []
            for rid, vmset in self.db.execute("SELECT id, vmset FROM rollups WHERE metric=? AND bucket>? AND bucket<=?",
                                              (m, start - self.bucket, end)):
                k = self._position(vmset, vid)
                if k is None:
                    continue
                with self.db.blobopen("rollups", "data", rid, readonly=True) as blob:
                    blob.seek(k * ROLLUP_DTYPE.itemsize)
                    parts.append(blob.read(ROLLUP_DTYPE.itemsize))
            records = np.frombuffer(b"".join(parts), dtype=ROLLUP_DTYPE)
            raw = sorted(self._open_window(vid, m, start, end))
            return np.array([v for _, v in raw], dtype=np.float64), records

    # -- upkeep
    def retention(self, now: float) -> RetentionResult:
        """Close buckets that ended (a metric nobody reports any more), drop raw blocks older than
        `raw_seconds` and rollups older than `rollup_seconds`, and forget VM sets nothing uses."""
        with self._lock:
            raw_cut = math.floor((now - self.raw_seconds) / self.bucket) * self.bucket
            roll_cut = math.floor((now - self.rollup_seconds) / self.bucket) * self.bucket
            self.db.execute("BEGIN")
            try:
                for m in list(self._open):
                    self._close_buckets(m, now)
                blocks = self.db.execute("DELETE FROM blocks WHERE bucket<?", (raw_cut,)).rowcount
                rollups = self.db.execute("DELETE FROM rollups WHERE bucket<?", (roll_cut,)).rowcount
                self.db.execute("DELETE FROM vmsets WHERE id NOT IN (SELECT vmset FROM blocks UNION "
                                "SELECT vmset FROM rollups UNION SELECT vmset FROM pending)")
                self.raw_floor = max(self.raw_floor, raw_cut)
                self.rollup_floor = max(self.rollup_floor, roll_cut)
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('raw_floor', ?), ('rollup_floor', ?)",
                                (self.raw_floor, self.rollup_floor))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                self._reload()
                raise
            self._digests = dict(self.db.execute("SELECT digest, id FROM vmsets"))
            self._vmsets.clear()
            self._recent.compact()
            return RetentionResult(blocks, rollups, self.raw_floor, self.rollup_floor)

    def size_bytes(self) -> int:
        """The store's size on disk: the database file and its write-ahead log."""
        return sum(p.stat().st_size for p in (self.path, self.path.with_name(self.path.name + "-wal"))
                   if p.exists())

    def footprint(self) -> dict[str, int]:
        """Bytes of payload per kind (raw blocks, rollups, the open bucket, VM sets) and pages in use."""
        with self._lock:
            q = self.db.execute
            out = {
                "raw": q("SELECT coalesce(sum(length(times) + length(data)), 0) FROM blocks").fetchone()[0],
                "rollups": q("SELECT coalesce(sum(length(data)), 0) FROM rollups").fetchone()[0],
                "pending": q("SELECT coalesce(sum(length(data)), 0) FROM pending").fetchone()[0],
                "vmsets": q("SELECT coalesce(sum(length(ids)), 0) FROM vmsets").fetchone()[0],
            }
            pages = q("PRAGMA page_count").fetchone()[0] - q("PRAGMA freelist_count").fetchone()[0]
            out["pages"] = pages * q("PRAGMA page_size").fetchone()[0]
            return out
