"""The run-time morph loop: samples → rules → a plan for one VM → apply, with events.

    monitor ──▶ Series ──▶ RuleEngine.evaluate ──▶ Decision(fire | revert, target)
                                                      │  plan({vm: target}, the VM as observed)
                                                      ▼
                      Applier: snapshot → change → verify → stability window → keep, or roll back
                                                      │
                        events (Store), metrics, notify ◀── MorphOutcome

`Runtime.step(now)` is one round: sample every VM of the program (or take the samples given, when a
recording is replayed), evaluate the rules (controller/rules.py) on the VMs as observed, and act on every
decision to fire or revert through the same planner (controller/plan.py) and applier (controller/apply.py)
as a repository apply. So a morph is snapshotted before it changes anything, verified after, watched over a
stability window, and rolled back to its snapshot when the VM turns unhealthy; and the record it leaves
(controller/domain_xml.py) is what the reconciler reads as `morphed`, never as drift.

A change that restarts the VM (an OS swap, a device change the driver cannot hot-plug) runs in a worker
thread and marks the VM busy: its rules give `paused` until the change is kept or rolled back, then
resume. `workers="all"` runs every change that way, so the controller's loop keeps sampling through the
stability windows; `workers="none"` runs everything in the caller's thread. While any change is in flight
the Runtime holds the program's apply lock, so a reconcile (or `vmflow apply` elsewhere) waits, and while
another process holds it the rules wait (`paused`).

What the engine remembers (cooldowns, hysteresis, the hourly count) is saved in the store after every
round and restored when a Runtime starts, so a controller restart keeps it. specs/morphs.md, "Run time",
states the semantics.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from compiler import model as M
from controller.apply import Applier, ApplyRefused
from controller.hypervisor import Hypervisor, HypervisorError
from controller.images_repo import ImageError, ImageRepo
from controller.metrics import Metrics
from controller.monitor import AppSource, LibvirtSource, Monitor, Sample, apps_in_rules
from controller.plan import Action, Change, Options, Plan, plan
from controller.rules import Decision, Kind, Limits, RuleEngine
from controller.state import ActualState, VmState
from controller.store import LockHeld, Series, Store

log = logging.getLogger("vmflow.morph")

# Every outcome a MorphOutcome (and a morph event) can have.
OUTCOMES = ("fired", "applied", "reverted", "rolled-back", "failed", "skipped-cooldown", "skipped-rate",
            "skipped-bound", "skipped-capacity", "skipped-concurrency", "paused")
WORKERS = ("restart", "all", "none")


def rules_key(program: str) -> str:
    """The store document that holds the rule engine's state for `program`."""
    return f"rules:{program}"


@dataclass(frozen=True)
class MorphOutcome:
    """One event of the morph loop: a decision of the rules, or what applying it did."""

    at: float  # (simulated) time of the round, or when a change run in a worker ended
    vm: str
    morph: str
    outcome: str  # one of OUTCOMES
    reason: str  # human: "cpu 91.2% > 80% for 30s: cpu 2 → 4"
    before: VmState | None
    after: VmState | None  # the VM as observed after the change (None when nothing was attempted)
    seconds: float  # how long the change took
    detail: str | None = None  # why it was rolled back or failed

    @property
    def message(self) -> str:
        """One line for people: what the event log shows."""
        text = f"{self.morph}: {self.reason}"
        if self.outcome in ("applied", "reverted"):
            text += f" ({self.outcome} in {self.seconds:.1f}s)"
        elif self.outcome in ("rolled-back", "failed"):
            text += f"; {self.outcome}" + (f": {self.detail}" if self.detail else "")
        return text

    def data(self) -> dict:
        """JSON-ready: what the event records beside its message, and what the webhook posts."""
        return {"morph": self.morph, "outcome": self.outcome, "reason": self.reason, "detail": self.detail,
                "seconds": round(self.seconds, 3), "before": _brief(self.before), "after": _brief(self.after)}


def _brief(vm: VmState | None) -> dict | None:
    if vm is None:
        return None
    return {"vcpus": vm.vcpus, "memory_kib": vm.memory_kib, "image": vm.image, "running": vm.running,
            "disks": [d.name for d in vm.disks], "nics": [n.name for n in vm.nics],
            "morphs": list(vm.owner.morphs) if vm.owner else []}


def _size(kib: int) -> str:
    for unit, size in (("GiB", 1024**2), ("MiB", 1024)):
        if abs(kib) >= size:
            return f"{kib / size:.1f}".removesuffix(".0") + unit
    return f"{kib}KiB"


class Runtime:
    """The morph loop of one program on one hypervisor; see the module docstring and `step`."""

    def __init__(self, program: str, hv: Hypervisor, store: Store, series: Series, *,
                 limits: Limits = Limits(), interval: float = 10.0, stability: float = 30.0,  # noqa: B008
                 metrics: Metrics | None = None, notify: Callable[[MorphOutcome], None] | None = None,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
                 saved: Callable[[], None] = lambda: None, images: ImageRepo | None = None,
                 health: dict[str, tuple[str, object]] | None = None, record_skips: bool = True,
                 workers: str = "restart", keep_snapshots: int = 3, health_timeout: float = 20.0,
                 stability_interval: float = 5.0, max_gap: float | None = None) -> None:
        if workers not in WORKERS:
            raise ValueError(f"workers must be one of {', '.join(WORKERS)}, not {workers!r}")
        self.program = program
        self.hv = hv
        self.store = store
        self.series = series
        self.limits = limits
        self.interval = interval
        self.stability = stability
        self.stability_interval = stability_interval
        self.metrics = metrics
        self.notify = notify
        self.clock = clock
        self.sleep = sleep
        self.images = images
        self.record_skips = record_skips
        self.workers = workers
        self.keep_snapshots = keep_snapshots
        self.health_timeout = health_timeout
        self._saved = saved
        self._health_given = dict(health or {})
        self.health: dict[str, tuple[str, object]] = dict(self._health_given)
        self.specs: dict[str, M.VmSpec] = {}
        self.pools: dict[str, M.PoolSpec] = {}
        # A window may have a stretch without samples of a little more than one interval (a slow round).
        gap = max_gap if max_gap is not None else max(1.5 * interval, interval + 5.0)
        self._engine = RuleEngine(limits, max_gap=gap)
        doc = store.get_doc(rules_key(program))
        if doc:
            try:
                self._engine.restore(doc)
            except ValueError as e:
                log.warning(f"the saved state of the rules is not usable, starting afresh: {e}")
        self.monitor = Monitor([LibvirtSource(hv, lambda: list(self.specs)),
                                AppSource(hv, lambda: apps_in_rules(self.specs.values()))], series, interval)
        self.stopping = threading.Event()
        # Set while an operator has suspended the program (`vmflow suspend`): rounds still sample, so the
        # rules' windows stay covered, but nothing is evaluated and nothing changes.
        self.suspended = False
        self._lock = threading.Lock()  # guards what workers and the caller's thread share below
        self._inflight: dict[str, tuple[str, VmState]] = {}  # vm -> (morph, target) being applied
        self._threads: dict[str, threading.Thread] = {}
        self._done: list[MorphOutcome] = []  # outcomes of workers, returned by the next step
        self._appliers: set[Applier] = set()
        self._lease_lock = threading.Lock()
        self._lease = 0  # changes in flight; the program's apply lock is held while it is above 0
        self._save_lock = threading.Lock()

    # -- what the loop works on
    @property
    def engine(self) -> RuleEngine:
        return self._engine

    def load(self, program: M.Program) -> None:
        """The VMs, pools and health checks the rules come from: called after every applied revision. The
        engine forgets the VMs that left the program."""
        for gone in set(self.specs) - set(program.vms):
            self._engine.forget(gone)
        health = {vm.name: (vm.health.kind, vm.health.arg) for vm in program.vms.values() if vm.health}
        self.specs = dict(program.vms)
        self.pools = dict(program.pools)
        self.health = {**health, **self._health_given}

    def rebind(self, hv: Hypervisor) -> None:
        """Work through another connection from now on (the controller's was reopened)."""
        self.hv = hv
        for source in self.monitor.sources:
            source.hv = hv

    def due(self, now: float) -> bool:
        """Whether a round is due: `interval` seconds since the last live sample."""
        return self.monitor.due(now)

    def busy(self) -> set[str]:
        """The VMs being morphed right now (their changes run in workers)."""
        with self._lock:
            return set(self._inflight)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._threads)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the changes running in workers; True when none is left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                threads = list(self._threads.values())
            if not threads:
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            threads[0].join(left)

    def stop(self) -> None:
        """Ask to stop, without waiting (a signal handler may call it): no new change starts, and the
        changes in flight end their stability windows early, keeping what they verified once."""
        self.stopping.set()
        with self._lock:
            for a in self._appliers:
                a.stopping.set()

    def close(self, timeout: float | None = None) -> None:
        """Stop, and wait for the changes in flight to finish (or roll back)."""
        self.stop()
        self.wait(timeout)

    # -- one round
    def step(self, now: float, samples: Iterable[Sample] | None = None) -> list[MorphOutcome]:
        """One round at `now`. Without `samples`, every VM is sampled live (the Monitor: libvirt's counters,
        the guest agent for `app(...)`) and the samples stored; with them, they are stored as given (a
        replay). Then the rules are evaluated on the program's running VMs as observed, and every decision
        to fire or revert is planned and applied. Returns what happened: the outcomes of changes that
        workers finished since the last round, this round's decisions, and the outcomes of the changes
        applied in this thread. Each is recorded as a `morph` event, counted in the metrics and passed to
        `notify`."""
        out = self._drain()
        if samples is None:
            r = self.monitor.round(now)
            if self.metrics is not None:
                self.metrics.sampled(r.seconds)
            for e in r.errors:
                log.warning(f"monitor: {e}")
        else:
            self.series.append(samples)
        if not self.specs or self.stopping.is_set() or self.suspended:
            return out
        try:
            actual = self.hv.observe(snapshots=False)
        except HypervisorError as e:
            log.warning(f"morphs wait: the VMs cannot be observed: {e}")
            return out
        owned = {n: vm for n, vm in actual.vms.items() if vm.owner and vm.owner.program == self.program}
        # A stopped VM gives no samples, and applying a morph would start it: only running VMs are evaluated.
        states = {n: vm for n, vm in owned.items() if n in self.specs and vm.running}
        busy = self.busy()
        if self._locked_elsewhere():
            busy |= set(states)  # an apply of the program runs elsewhere: every rule waits for it
        decisions = self._engine.evaluate(now, self.specs, states, self.series, busy, self._capacity(owned))
        for d in decisions:
            before = states.get(d.vm)
            if d.kind is Kind.SKIP:
                out.append(self._record(MorphOutcome(now, d.vm, d.morph, d.outcome.value, d.reason, before, None,
                                                     0.0), skip=True))
                continue
            if d.kind is Kind.FIRE:
                out.append(self._record(MorphOutcome(now, d.vm, d.morph, "fired", d.reason, before, None, 0.0)))
            done = self._act(d, before, now)
            if done is not None:
                out.append(done)
        self.store.put_doc(rules_key(self.program), self._engine.state())
        return out

    # -- capacity
    def _pool_of(self, vm: str, state: VmState | None = None) -> str | None:
        """The pool a VM counts against: its declared pool, else the program's only pool (as the compiler's
        capacity check counts it)."""
        spec = self.specs.get(vm)
        pool = spec.pool if spec is not None else (state.pool if state is not None else None)
        if pool is None and len(self.pools) == 1:
            pool = next(iter(self.pools))
        return pool

    def _capacity(self, owned: dict[str, VmState]) -> Callable[[str, VmState], str | None]:
        """`capacity_ok(vm, target)` for one round: the pool's VMs as observed (those being changed at their
        target), plus the fires already let through this round, plus this one's growth, against the pool's
        `cpu` and `memory`. Says what is missing, or None when it fits."""
        with self._lock:
            inflight = {vm: target for vm, (_m, target) in self._inflight.items()}
        sizes = {n: ((inflight.get(n) or vm).vcpus, (inflight.get(n) or vm).memory_kib) for n, vm in owned.items()}
        used: dict[str, list[int]] = {}
        for n, vm in owned.items():
            pool = self._pool_of(n, vm)
            if pool is not None:
                u = used.setdefault(pool, [0, 0])
                u[0] += sizes[n][0]
                u[1] += sizes[n][1]

        def capacity_ok(vm: str, target: VmState) -> str | None:
            pool = self._pool_of(vm, target)
            spec = self.pools.get(pool) if pool is not None else None
            if spec is None:
                return None
            cur_cpu, cur_mem = sizes.get(vm, (target.vcpus, target.memory_kib))
            u = used.setdefault(pool, [0, 0])
            cpu = u[0] + target.vcpus - cur_cpu
            mem = u[1] + target.memory_kib - cur_mem
            short = []
            if spec.cpu is not None and target.vcpus > cur_cpu and cpu > spec.cpu:
                short.append(f"{cpu} vCPUs needed, {spec.cpu} in the pool ({cpu - spec.cpu} missing)")
            cap_mem = spec.memory // 1024 if spec.memory is not None else None
            if cap_mem is not None and target.memory_kib > cur_mem and mem > cap_mem:
                short.append(f"{_size(mem)} of memory needed, {_size(cap_mem)} in the pool "
                             f"({_size(mem - cap_mem)} missing)")
            if short:
                return f"pool {pool} is short: " + "; ".join(short)
            # Let through: the next fire of this round in the same pool counts this one's growth.
            u[0], u[1] = cpu, mem
            sizes[vm] = (target.vcpus, target.memory_kib)
            return None

        return capacity_ok

    # -- acting on a decision
    def _change(self, target: VmState, before: VmState) -> tuple[Change | None, str | None]:
        """The change that takes `before` to `target`, from the planner. The VM is compared path by path with
        its record's morphs left out: those tell the planner what a repository apply may leave alone, while
        here every difference is what the morph asks for. A target that differs only in its record (a revert
        whose size another morph still explains) is a live update that rewrites the record."""
        have = replace(before, owner=replace(before.owner, morphs=())) if before.owner else before
        p = plan({target.name: target}, ActualState({target.name: have}, (), self.hv.uri),
                 Options(device_hotplug=self.hv.capabilities.device_hotplug,
                         cpu_unplug=self.hv.capabilities.cpu_unplug))
        (change,) = p.changes
        if change.action in (Action.UPDATE_LIVE, Action.UPDATE_RESTART):
            return change, None
        if change.action is Action.NOOP:
            if before.owner is not None and target.owner is not None and before.owner.morphs != target.owner.morphs:
                return Change(change.address, Action.UPDATE_LIVE, have, target, ()), None
            return None, "the VM is already in the target state"
        return None, f"the planner made this a {change.action.value}, which a morph never is"

    def _act(self, d: Decision, before: VmState | None, now: float) -> MorphOutcome | None:
        """Plan and apply a decision's target: here, or in a worker for a restart (or every change with
        `workers="all"`), in which case the outcome comes with a later round."""
        if before is None or d.target is None:  # the engine only acts on observed VMs; kept as a guard
            return self._record(MorphOutcome(now, d.vm, d.morph, "failed", d.reason, before, None, 0.0,
                                             "the VM was not observed"))
        change, why = self._change(d.target, before)
        if change is None:
            return self._record(MorphOutcome(now, d.vm, d.morph, "failed", d.reason, before, None, 0.0, why))
        background = self.workers == "all" or (self.workers == "restart" and change.action is Action.UPDATE_RESTART)
        with self._lock:
            self._inflight[d.vm] = (d.morph, d.target)
        if not background:
            try:
                out = self._run(d, before, change, now)
            finally:
                with self._lock:
                    self._inflight.pop(d.vm, None)
            return self._record(out)
        t = threading.Thread(target=self._worker, args=(d, before, change), name=f"vmflow-morph-{d.vm}", daemon=True)
        with self._lock:
            self._threads[d.vm] = t
        t.start()
        return None

    def _worker(self, d: Decision, before: VmState, change: Change) -> None:
        try:
            out = self._run(d, before, change, None)
        except Exception as e:  # a bug must not leave the VM busy for ever
            log.exception(f"morph {d.morph} of {d.vm}: internal error")
            out = MorphOutcome(self.clock(), d.vm, d.morph, "failed", d.reason, before, None, 0.0,
                               f"internal error: {type(e).__name__}: {e}")
        try:
            self._record(out)
        finally:
            with self._lock:
                self._inflight.pop(d.vm, None)
                self._threads.pop(d.vm, None)
                self._done.append(out)

    def _run(self, d: Decision, before: VmState, change: Change, at: float | None) -> MorphOutcome:
        """Snapshot, change, verify, stability window, keep or roll back: one change through an Applier of
        its own, under the program's apply lock. The VM keeps the revision it was applied from."""
        t0 = time.perf_counter()
        revision = before.owner.revision if before.owner else None
        result, detail, seconds = "failed", None, 0.0
        try:
            self._take_lease(f"morph {d.morph} of {d.vm}")
        except (LockHeld, HypervisorError) as e:
            detail = f"not attempted: {e}"
        else:
            applier = Applier(self.hv, self.store, revision=revision, keep_snapshots=self.keep_snapshots,
                              progress=lambda m: log.info(m.strip()), saved=self._save, images=self.images,
                              health=self.health, health_timeout=self.health_timeout, stability=self.stability,
                              stability_interval=self.stability_interval, sleep=self.sleep)
            with self._lock:
                self._appliers.add(applier)
                if self.stopping.is_set():
                    applier.stopping.set()
            try:
                applied = applier.apply(Plan((change,), (), ()), self.program, recover=False,
                                        note={"morph": {"vm": d.vm, "name": d.morph, "intent": d.intent.value}})
                o = applied.outcomes[0]
                result, detail, seconds = o.result, o.detail, o.seconds
            except (ApplyRefused, HypervisorError, ImageError) as e:
                detail = str(e)
            finally:
                with self._lock:
                    self._appliers.discard(applier)
                self._give_lease()
        if result == "not-started":
            result, detail = "failed", "not attempted: vmflow is stopping"
        elif result == "applied" and d.intent is Kind.REVERT:
            result = "reverted"
        try:
            after = self.hv.observe_vm(d.vm)
        except HypervisorError:
            after = None
        return MorphOutcome(self.clock() if at is None else at, d.vm, d.morph, result, d.reason, before, after,
                            seconds or time.perf_counter() - t0, detail)

    # -- the program's apply lock, shared by the changes in flight
    def _take_lease(self, what: str) -> None:
        with self._lease_lock:
            if self._lease == 0:
                self.store.acquire(self.program, "vmflow morphs", what)
                try:
                    # No change of ours is in flight and the lock is ours: an intent left open in the
                    # journal is from a process that died during it.
                    for line in Applier(self.hv, self.store, saved=self._save).recover():
                        self.store.add_event(self.program, None, "morph", "recovered", line)
                except HypervisorError:
                    self.store.release(self.program)
                    raise
            self._lease += 1

    def _give_lease(self) -> None:
        with self._lease_lock:
            self._lease -= 1
            if self._lease == 0:
                self.store.release(self.program)

    def _locked_elsewhere(self) -> bool:
        """True when another apply of the program holds its lock (a reconcile, `vmflow apply`)."""
        info = self.store.lock_info(self.program)
        if info is None:
            return False
        with self._lease_lock:
            return not (self._lease > 0 and info.pid == os.getpid())

    def _save(self) -> None:
        # Changes in several workers: each save writes the whole state, so they must not interleave.
        with self._save_lock:
            self._saved()

    # -- reporting
    def _record(self, o: MorphOutcome, skip: bool = False) -> MorphOutcome:
        if not skip or self.record_skips:
            self.store.add_event(self.program, o.vm, "morph", o.outcome, o.message, o.data(), at=o.at)
            if self.metrics is not None:
                self.metrics.morph_event(self.program, o.vm, o.outcome)
        level = logging.WARNING if o.outcome in ("rolled-back", "failed") else logging.INFO
        if not skip or level == logging.WARNING:
            log.log(level, f"{o.vm} {o.outcome}: {o.message}", extra={"fields": {"vm": o.vm, "morph": o.morph}})
        if self.notify is not None:
            try:
                self.notify(o)
            except Exception:  # a listener's failure is its own, never the loop's
                log.exception("morph listener failed")
        return o

    def _drain(self) -> list[MorphOutcome]:
        with self._lock:
            out, self._done = self._done, []
        return out

