"""`vmflow controller`: the long-running service around `Reconciler.reconcile_once`.

One thread runs the loop and is the only one that touches git, libvirt and the database's status; the
others only wake it:

  watcher   watchfiles on a local repository's refs: a commit is noticed in well under a second
  webhook   POST /hooks/git (controller/server.py) queues a reconcile of the pushed branch
  timers    the poll (a remote is fetched every `poll` seconds, with jitter so a fleet of controllers does
            not fetch in step) and the resync (every `resync` seconds the program is reconciled even
            without a new commit, which is how drift is noticed)

A temporary error (remote or libvirt unreachable, the apply lock held) is retried with exponential backoff
and jitter, capped; a permanent one waits for the next revision (controller/reconcile.py).

SIGTERM or SIGINT: the change in flight finishes (or rolls back), no further change starts, the journal is
left with no open intent, and the process exits 0.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from controller.gitsource import GitSource
from controller.metrics import Metrics
from controller.reconcile import Reconciler, Settings, TemporaryError, control_key
from controller.store import Store

log = logging.getLogger("vmflow.controller")

DEFAULT_LISTEN = "127.0.0.1:8787"


@dataclass
class Config:
    repo: str
    branch: str = "main"
    path: str = ""
    libvirt: str | None = None
    state_dir: Path = Path(".vmflow")
    listen: str | None = DEFAULT_LISTEN  # None: no HTTP
    poll: float | None = None  # default: 30 s for a remote; 60 s for a local repository (the watcher is faster)
    resync: float = 60.0
    token: str | None = None
    webhook_secret: str | None = None
    watch: bool = True
    backoff_base: float = 2.0
    backoff_max: float = 300.0
    settings: Settings = field(default_factory=Settings)


class Controller:
    """The service. Implements controller.server.ControllerHandle for the HTTP endpoints."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.state_dir = cfg.state_dir.resolve()
        self.store = Store(self.state_dir / "vmflow.db")
        self.source = GitSource(cfg.repo, cfg.branch, cfg.path, cache_dir=self.state_dir / "git")
        self.branch = cfg.branch
        self.metrics = Metrics()
        self.reconciler = Reconciler(self.source, self.store, self.state_dir, libvirt_uri=cfg.libvirt,
                                     settings=cfg.settings, metrics=self.metrics,
                                     progress=lambda m: log.info(m.strip(), extra={"fields": {"apply": True}}))
        self.program = self.reconciler.program
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._queue: list[tuple[str, str | None]] = []
        self._ops: list[tuple[str, str]] = []
        self._status: dict = self.store.get_status(self.program) or {}
        self._ready = False
        self._heartbeat = time.monotonic()
        self._busy_since: float | None = None
        self.server = None
        self.watch_thread: threading.Thread | None = None
        poll = cfg.poll if cfg.poll is not None else (60.0 if self.source.local else 30.0)
        self.poll = max(poll, 0.5)

    # -- ControllerHandle
    def status(self) -> dict:
        with self._lock:
            return {"program": self.program, "ready": self._ready, "status": dict(self._status)}

    def ready(self) -> tuple[bool, str]:
        if not self._ready:
            return False, "the first reconcile has not finished yet"
        return True, "ok"

    def live(self) -> tuple[bool, str]:
        # A long apply is not a hang: while one runs, the apply's progress moves the heartbeat.
        age = time.monotonic() - self._heartbeat
        limit = max(self.cfg.resync, self.poll) * 3 + 600
        if age > limit:
            return False, f"the loop has not moved for {age:.0f}s"
        return True, "ok"

    def request_sync(self, reason: str, revision: str | None = None) -> None:
        with self._lock:
            self._queue.append((reason, revision))
        self._wake.set()

    def suspend(self, reason: str) -> None:
        with self._lock:
            self._ops.append(("suspend", reason))
        self._wake.set()

    def resume(self) -> None:
        with self._lock:
            self._ops.append(("resume", ""))
        self._wake.set()

    # -- running
    def stop(self, *_sig) -> None:
        """Finish the change in flight, start no other, exit the loop."""
        self._stop.set()
        self.reconciler.stopping = True
        applier = self.reconciler.applier
        if applier is not None:
            applier.stopping.set()
        self._wake.set()

    def run_once(self) -> int:
        try:
            outcome = self.reconciler.reconcile_once(trigger="once")
        except TemporaryError as e:
            log.error(f"reconcile failed: {e}", extra={"fields": {"reason": e.reason}})
            self._refresh()
            return 1
        self._refresh()
        return 0 if outcome.result in ("synced", "noop", "out-of-sync", "suspended") else 1

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.stop)
        self._start_http()
        self._start_watcher()
        log.info("controller started", extra={"fields": {
            "program": self.program, "repo": self.cfg.repo, "branch": self.cfg.branch, "path": self.cfg.path,
            "poll": self.poll, "resync": self.cfg.resync, "watch": bool(self.watch_thread),
            "listen": self.server.url if self.server else None}})
        next_poll = next_resync = 0.0  # both due at once: the first round reconciles
        retry_at: float | None = None
        failures = 0
        last_head = None
        try:
            while not self._stop.is_set():
                self._heartbeat = time.monotonic()
                self._apply_ops()
                now = time.monotonic()
                with self._lock:
                    queued, self._queue = self._queue, []
                trigger = None
                if queued:
                    trigger = queued[-1][0]
                elif retry_at is not None:
                    # Backing off: neither the resync nor the poll may cut the wait short.
                    if now >= retry_at:
                        trigger = "retry"
                elif now >= next_resync:
                    trigger = "resync"
                elif now >= next_poll:
                    next_poll = now + self._jitter(self.poll)
                    try:
                        self.source.fetch()
                        head = self.source.head()
                    except Exception as e:  # noqa: BLE001 - reported, then retried by the resync
                        log.warning(f"poll failed: {e}")
                        head = None
                    if head is not None and head != last_head and last_head is not None:
                        trigger = f"poll: {self.cfg.branch} moved to {head[:12]}"
                    last_head = head or last_head
                if trigger is None:
                    deadline = min(next_poll, next_resync, retry_at if retry_at is not None else float("inf"))
                    self._wake.wait(max(0.0, min(deadline - time.monotonic(), 5.0)))
                    self._wake.clear()
                    continue
                try:
                    self.reconciler.reconcile_once(trigger=trigger)
                    failures, retry_at = 0, None
                except TemporaryError as e:
                    failures += 1
                    delay = self._jitter(min(self.cfg.backoff_base * 2 ** (failures - 1), self.cfg.backoff_max))
                    retry_at = time.monotonic() + delay
                    log.warning(f"{e.reason}: {e}; retrying in {delay:.1f}s",
                                extra={"fields": {"reason": e.reason, "attempt": failures}})
                except Exception as e:  # noqa: BLE001 - a bug must not kill the service; it is logged and retried
                    failures += 1
                    delay = self._jitter(min(self.cfg.backoff_base * 2 ** (failures - 1), self.cfg.backoff_max))
                    retry_at = time.monotonic() + delay
                    log.exception(f"internal error during reconcile: {type(e).__name__}: {e}")
                self._ready = True
                self._refresh()
                try:
                    last_head = self.source.head()
                except Exception:  # noqa: BLE001
                    pass
                next_resync = time.monotonic() + self.cfg.resync
        finally:
            log.info("controller stopping", extra={"fields": {"program": self.program}})
            if self.server is not None:
                self.server.stop()
            self.reconciler.close()
            self.store.close()
        return 0

    def _jitter(self, seconds: float) -> float:
        return seconds * random.uniform(0.9, 1.1)

    def _refresh(self) -> None:
        doc = self.store.get_status(self.program) or {}
        with self._lock:
            self._status = doc

    def _apply_ops(self) -> None:
        with self._lock:
            ops, self._ops = self._ops, []
        for op, reason in ops:
            set_suspended(self.store, self.program, op == "suspend", reason or "suspended over HTTP")
            log.info(f"{op}ed", extra={"fields": {"program": self.program, "reason": reason}})
            if op == "resume":
                self.request_sync("resumed")

    def _start_http(self) -> None:
        if not self.cfg.listen:
            return
        from controller.server import make_app, serve

        host, _, port = self.cfg.listen.rpartition(":")
        app = make_app(self, self.metrics, token=self.cfg.token, webhook_secret=self.cfg.webhook_secret)
        self.server = serve(app, host or "127.0.0.1", int(port))

    def _start_watcher(self) -> None:
        paths = self.source.watch_paths() if self.cfg.watch else []
        if not paths:
            return
        self.watch_thread = threading.Thread(target=self._watch, args=(paths,), name="vmflow-watch", daemon=True)
        self.watch_thread.start()

    def _watch(self, paths: list[Path]) -> None:
        import watchfiles

        # A short debounce: a commit touches a ref file and the logs within a few milliseconds.
        # The source's own filter: watchfiles' default one ignores everything under a `.git` folder.
        for _changes in watchfiles.watch(*paths, watch_filter=self.source.watch_filter, stop_event=self._stop,
                                         debounce=30, step=10, yield_on_timeout=False, raise_interrupt=False):
            self.request_sync(f"watch: a ref of {self.cfg.repo} changed")


def set_suspended(store: Store, program: str, suspended: bool, reason: str) -> None:
    ctl = store.get_doc(control_key(program), {})
    ctl["suspended"] = {"since": time.time(), "reason": reason} if suspended else None
    store.put_doc(control_key(program), ctl)


def set_pin(store: Store, program: str, pin: dict | None) -> None:
    ctl = store.get_doc(control_key(program), {})
    ctl["pin"] = pin
    store.put_doc(control_key(program), ctl)


# -- logging


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message and the record's structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        doc.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    """`time level message key=value…`: readable in a terminal and in journald."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {}) or {}
        kv = " ".join(f"{k}={json.dumps(v, default=str) if not isinstance(v, str) or ' ' in v else v}"
                      for k, v in fields.items() if v not in (None, {}, []))
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        out = f"{ts} {record.levelname.lower():7} {record.getMessage()}" + (f"  {kv}" if kv else "")
        if record.exc_info:
            out += "\n" + self.formatException(record.exc_info)
        return out


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("vmflow")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
