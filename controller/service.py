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

Between reconciles the same thread runs the morph loop (controller/runtime.py) every `monitor_interval`
seconds: it samples the VMs, evaluates the rules of the revision last applied and applies what fires, each
change in a worker thread (snapshot, change, verify, stability window). While a morph is in flight it holds
the program's apply lock, so a reconcile that comes due waits for it. With `notify_url`, every failed or
rolled-back morph and every failed reconcile is POSTed there as a small JSON document.

SIGTERM or SIGINT: the change in flight finishes (or rolls back), no further change starts, the journal is
left with no open intent, and the process exits 0.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from controller import context
from controller.gitsource import GitError, GitSource
from controller.metrics import Metrics
from controller.reconcile import Reconciler, Settings, TemporaryError, control_key
from controller.rules import Limits
from controller.runtime import MorphOutcome, Runtime
from controller.store import Series, Store, series_path

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
    # Seconds between morph rounds; 0: no monitoring, no morphs. None: 10 on a real hypervisor and off on
    # the embedded default, whose test driver reports made-up counters (its CPU time is the wall clock).
    monitor_interval: float | None = None
    stability: float = 30.0  # seconds a morphed VM must stay healthy before the change is kept
    limits: Limits = field(default_factory=Limits)  # morphs per VM per hour, morphs at once
    notify_url: str | None = None  # a webhook for failed and rolled-back morphs and failed reconciles


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
        # The morph loop, made once a revision has been applied (it needs that revision's program).
        self.runtime: Runtime | None = None
        self.monitor_interval = cfg.monitor_interval if cfg.monitor_interval is not None else 10.0
        self.series: Series | None = None
        self._runtime_store: Store | None = None
        self._runtime_rev: str | None = None
        self._runtime_uri: str | None = None
        self._next_retention = 0.0
        self.notifier = Notifier(cfg.notify_url, self.program) if cfg.notify_url else None
        self._notified: tuple | None = None  # the last reconcile failure posted, so a stall is posted once

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
        if self.runtime is not None:
            self.runtime.stop()
        self._wake.set()

    def run_once(self) -> int:
        try:
            try:
                outcome = self.reconciler.reconcile_once(trigger="once")
            except TemporaryError as e:
                log.error(f"reconcile failed: {e}", extra={"fields": {"reason": e.reason}})
                self._notify_reconcile("retry", None, f"{e.reason}: {e}")
                self._refresh()
                return 1
            self._notify_reconcile(outcome.result, outcome.revision, outcome.message)
            self._refresh()
            return 0 if outcome.result in ("synced", "noop", "out-of-sync", "suspended") else 1
        finally:
            if self.notifier is not None:
                self.notifier.close(timeout=10)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.stop)
        self._start_http()
        self._start_watcher()
        log.info("controller started", extra={"fields": {
            "program": self.program, "repo": self.cfg.repo, "branch": self.cfg.branch, "path": self.cfg.path,
            "poll": self.poll, "resync": self.cfg.resync, "watch": bool(self.watch_thread),
            "listen": self.server.url if self.server else None, "monitor_interval": self.monitor_interval}})
        next_poll = next_resync = 0.0  # both due at once: the first round reconciles
        next_monitor = 0.0
        retry_at: float | None = None
        failures = 0
        last_head = None
        try:
            while not self._stop.is_set():
                self._heartbeat = time.monotonic()
                self._apply_ops()
                if self.runtime is not None and time.monotonic() >= next_monitor:
                    next_monitor = time.monotonic() + self.monitor_interval
                    self._morph_round()
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
                postponed = trigger is not None and self.runtime is not None and self.runtime.in_flight() > 0
                if postponed:
                    # A morph holds the program's apply lock: reconcile once it is kept or rolled back.
                    with self._lock:
                        self._queue.insert(0, (trigger, None))
                    trigger = None
                if trigger is None:
                    deadline = min(next_poll, next_resync, retry_at if retry_at is not None else float("inf"),
                                   next_monitor if self.runtime is not None else float("inf"))
                    self._wake.wait(max(0.0, min(deadline - time.monotonic(), 1.0 if postponed else 5.0)))
                    self._wake.clear()
                    continue
                try:
                    outcome = self.reconciler.reconcile_once(trigger=trigger)
                    failures, retry_at = 0, None
                    self._notify_reconcile(outcome.result, outcome.revision, outcome.message)
                except TemporaryError as e:
                    failures += 1
                    delay = self._jitter(min(self.cfg.backoff_base * 2 ** (failures - 1), self.cfg.backoff_max))
                    retry_at = time.monotonic() + delay
                    log.warning(f"{e.reason}: {e}; retrying in {delay:.1f}s",
                                extra={"fields": {"reason": e.reason, "attempt": failures}})
                    self._notify_reconcile("retry", None, f"{e.reason}: {e}")
                except Exception as e:  # noqa: BLE001 - a bug must not kill the service; it is logged and retried
                    failures += 1
                    delay = self._jitter(min(self.cfg.backoff_base * 2 ** (failures - 1), self.cfg.backoff_max))
                    retry_at = time.monotonic() + delay
                    log.exception(f"internal error during reconcile: {type(e).__name__}: {e}")
                    self._notify_reconcile("error", None, f"internal error: {type(e).__name__}: {e}")
                self._ready = True
                self._sync_runtime()
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
            if self.runtime is not None:
                self.runtime.close()  # the morphs in flight finish (or roll back) first
            if self.notifier is not None:
                self.notifier.close(timeout=10)  # what is queued still goes out, within reason
            self.reconciler.close()
            if self.series is not None:
                self.series.close()
            if self._runtime_store is not None:
                self._runtime_store.close()
            self.store.close()
        return 0

    # -- the morph loop
    def _sync_runtime(self) -> None:
        """After a reconcile: give the morph loop the program of the revision last applied (made on the
        first one). The program is compiled again from git, which costs little: the compiler keeps every
        file it has seen by content hash."""
        if self.monitor_interval <= 0:
            return
        rev = ((self.store.get_status(self.program) or {}).get("revisions") or {}).get("last_applied")
        if rev is None or (rev == self._runtime_rev and self.runtime is not None):
            return
        try:
            comp = self.source.compile(self.reconciler.compiler, rev)
            if not comp.ok:
                return
            t = context.target(comp, self.program, Path(self.source.path or "."), self.cfg.libvirt, self.state_dir,
                               self.cfg.settings.image_root)
            hv = self.reconciler.hypervisor(t.uri)
        except (GitError, context.ContextError, TemporaryError) as e:
            log.warning(f"morphs keep the rules of {self._runtime_rev or 'no revision'}: {e}")
            return
        uri = t.uri
        if self.cfg.monitor_interval is None and t.embedded:
            self.monitor_interval = 0.0
            log.info("no live morphs on the embedded default: libvirt's test driver has no real resource "
                     "counters; `vmflow simulate` replays traces through the rules, and --monitor-interval "
                     "turns sampling on anyway")
            return
        if self.runtime is None:
            self.series = Series(series_path(self.state_dir))
            # A connection of its own: the morph workers write events and the journal while this thread's
            # connection may be inside a transaction of the reconciler's.
            self._runtime_store = Store(self.state_dir / "vmflow.db")
            self.runtime = Runtime(
                self.program, hv, self._runtime_store, self.series, limits=self.cfg.limits,
                interval=self.monitor_interval, stability=self.cfg.stability, metrics=self.metrics,
                notify=self._on_morph, saved=lambda: self.reconciler._saved(self._runtime_uri or uri),
                images=context.image_repo(t, hv), workers="all",
                keep_snapshots=self.cfg.settings.keep_snapshots)
        else:
            self.runtime.rebind(hv)
            self.runtime.images = context.image_repo(t, hv)
        self._runtime_uri = uri
        self.runtime.load(comp.program)
        self._runtime_rev = rev
        log.info("morph rules loaded", extra={"fields": {"revision": rev[:12], "vms": sum(
            1 for vm in comp.program.vms.values() if vm.morphs)}})

    def _morph_round(self) -> None:
        rt = self.runtime
        if rt.in_flight() == 0:
            # The reconciler reopens its connection when the embedded default's file changed under it.
            try:
                rt.rebind(self.reconciler.hypervisor(self._runtime_uri))
            except TemporaryError as e:
                log.warning(f"morph round skipped: {e}")
                return
        now = time.time()
        rt.suspended = bool(self.store.get_doc(control_key(self.program), {}).get("suspended"))
        try:
            rt.step(now)
        except Exception:  # a bug in a round must not stop the controller
            log.exception("internal error in a morph round")
        if now >= self._next_retention:
            self._next_retention = now + 3600
            try:
                self.series.retention(now)
            except Exception as e:  # the samples are kept a little longer; nothing else depends on it
                log.warning(f"time-series retention failed: {e}")

    def _on_morph(self, o: MorphOutcome) -> None:
        if self.notifier is not None:
            self.notifier.morph(o)
        if o.outcome in ("applied", "reverted", "rolled-back", "failed"):
            self._wake.set()  # a reconcile may be waiting for the change to finish

    def _notify_reconcile(self, result: str, revision: str | None, message: str) -> None:
        """Post a failed reconcile, once per failure: a stalled revision is reconciled again at every resync,
        and a retry streak posts its first failure only."""
        if self.notifier is None:
            return
        if result not in ("failed", "stalled", "retry", "error"):
            self._notified = None
            return
        key = (result, revision, message if result != "retry" else None)
        if key == self._notified:
            return
        self._notified = key
        self.notifier.reconcile(result, revision, message)

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


class Notifier:
    """The `--notify-url` webhook: a small JSON document POSTed for every failed or rolled-back morph and
    every failed reconcile. Posts go out from a thread of their own, in order, so a slow receiver never
    holds up the loop; a failure (unreachable, an HTTP error, the 5 s timeout) is logged, never raised."""

    NOTIFIED = ("failed", "rolled-back")

    def __init__(self, url: str, program: str, timeout: float = 5.0) -> None:
        self.url = url
        self.program = program
        self.timeout = timeout
        self.sent = 0
        self.failed = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="vmflow-notify", daemon=True)
        self._thread.start()

    def morph(self, o: MorphOutcome) -> None:
        if o.outcome in self.NOTIFIED:
            self.post({"kind": "morph", "vm": o.vm, "at": o.at, "message": o.message, **o.data()})

    def reconcile(self, result: str, revision: str | None, message: str) -> None:
        self.post({"kind": "reconcile", "outcome": result, "revision": revision, "message": message,
                   "at": time.time()})

    def post(self, doc: dict) -> None:
        self._queue.put({"program": self.program, **doc})

    def close(self, timeout: float | None = None) -> None:
        """Send what is queued (each post waits at most `timeout` seconds), then stop."""
        self._queue.put(None)
        self._thread.join(None if timeout is None else timeout)

    def _run(self) -> None:
        while True:
            doc = self._queue.get()
            if doc is None:
                return
            body = json.dumps(doc, default=str).encode()
            req = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "User-Agent": "vmflow-controller"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    r.read()
                self.sent += 1
            except (urllib.error.URLError, OSError, ValueError) as e:
                self.failed += 1
                log.warning(f"notify {self.url} failed: {getattr(e, 'reason', e)}",
                            extra={"fields": {"kind": doc.get("kind"), "outcome": doc.get("outcome")}})


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
