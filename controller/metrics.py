"""The controller's Prometheus metrics: what reconciling, morphing and monitoring did, as numbers.

The reconcile loop and the monitor report events here through plain methods (`reconciled`, `morph_event`,
`sampled`, `suspended_set`); `/metrics` in controller/server.py serves `render()`. Every metric lives in
this object's own registry, never prometheus_client's global one, so two controllers (or two tests) in one
process keep separate counts. specs/http.md lists each metric, its labels and their values.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from enum import Enum

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Label values are closed sets: an unknown one is a bug in the caller, and letting it through would
# quietly add a series nobody alerts on.
RESULTS = ("synced", "failed", "stalled", "noop")
ACTIONS = ("create", "update-live", "update-restart", "replace", "delete")
SYNC_STATUSES = ("Synced", "OutOfSync", "Unknown")
MORPH_OUTCOMES = (
    "fired",
    "applied",
    "rolled-back",
    "skipped-capacity",
    "skipped-cooldown",
    "skipped-rate",
    "skipped-bound",
    "skipped-concurrency",
    "reverted",
    "paused",
    "failed",
)
# A reconcile with nothing to do takes tens of milliseconds; one that restarts and verifies a batch of
# guests can take minutes.
RECONCILE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# One monitoring round reads every VM's counters once: milliseconds for a few VMs, seconds for thousands.
SAMPLE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SUCCESS_RESULTS = frozenset({"synced", "noop"})


def _label(value: object, allowed: tuple[str, ...], what: str) -> str:
    # str-valued enums (plan.Action) are accepted as their value: str() of such a member is its
    # qualified name, which would become the label.
    text = value.value if isinstance(value, Enum) else value
    if text not in allowed:
        raise ValueError(f"unknown {what} {text!r}: expected one of {', '.join(allowed)}")
    return text


class Metrics:
    """The controller's metrics, in a registry of their own. Safe to call from several threads."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        # Compound updates (swap the revision, move the sync status) hold this lock so a scrape never
        # sees two revisions or two statuses at 1 for one program.
        self._lock = threading.Lock()
        self._revision: dict[str, str] = {}
        self._known_programs: set[str] = set()
        self._known_vms: set[tuple[str, str]] = set()
        r = self.registry
        self.reconcile_duration = Histogram(
            "vmflow_reconcile_duration_seconds",
            "Time one reconcile of a program took, by result.",
            ("program", "result"),
            buckets=RECONCILE_BUCKETS,
            registry=r,
        )
        self.reconciles = Counter(
            "vmflow_reconciles_total", "Reconciles of a program, by result.", ("program", "result"), registry=r
        )
        self.changes_applied = Counter(
            "vmflow_changes_applied_total",
            "Changes applied to VMs by reconciles, by plan action.",
            ("program", "action"),
            registry=r,
        )
        self.rollbacks = Counter(
            "vmflow_rollbacks_total", "Changes reverted to their snapshot after failing.", ("program",), registry=r
        )
        self.drifted_vms = Gauge(
            "vmflow_drifted_vms",
            "VMs whose actual state differed from what was last applied, at the last reconcile.",
            ("program",),
            registry=r,
        )
        self.last_success = Gauge(
            "vmflow_last_success_timestamp_seconds",
            "Unix time of the program's last reconcile that ended synced or with nothing to do.",
            ("program",),
            registry=r,
        )
        self.revision_info = Gauge(
            "vmflow_revision_info",
            "The revision last applied to the program (always 1; the revision is the label).",
            ("program", "revision"),
            registry=r,
        )
        self.sync_status = Gauge(
            "vmflow_sync_status",
            "1 for the program's current sync status, 0 for the others.",
            ("program", "status"),
            registry=r,
        )
        self.suspended = Gauge(
            "vmflow_suspended", "1 while reconciling the program is suspended.", ("program",), registry=r
        )
        self.morph_events = Counter(
            "vmflow_morph_events_total",
            "Morph rule events, by VM and outcome.",
            ("program", "vm", "outcome"),
            registry=r,
        )
        self.monitor_sample = Histogram(
            "vmflow_monitor_sample_seconds",
            "Time one monitoring round (sampling every VM once) took.",
            buckets=SAMPLE_BUCKETS,
            registry=r,
        )

    # -------------------------------------------------------------------------------------- events

    def reconciled(
        self,
        program: str,
        result: str,
        seconds: float,
        changes: Mapping[str, int],
        rollbacks: int,
        drifted: int,
        revision: str | None,
        sync: str,
    ) -> None:
        """Record one finished reconcile of `program`.

        `changes` counts applied changes by plan action (missing actions count 0, `no-op` is ignored;
        plan.Action members are accepted as keys). `revision` None (the
        reconcile never got as far as a revision) keeps the revision last recorded.
        """
        result = _label(result, RESULTS, "reconcile result")
        sync = _label(sync, SYNC_STATUSES, "sync status")
        # A no-op is part of a plan but nothing was applied: a count of the plan's actions may hold it.
        counted = {
            _label(a, ACTIONS, "action"): n
            for a, n in changes.items()
            if (a.value if isinstance(a, Enum) else a) != "no-op"
        }
        with self._lock:
            self._touch_program(program)
            self.reconcile_duration.labels(program, result).observe(seconds)
            self.reconciles.labels(program, result).inc()
            for action, n in counted.items():
                if n:
                    self.changes_applied.labels(program, action).inc(n)
            if rollbacks:
                self.rollbacks.labels(program).inc(rollbacks)
            self.drifted_vms.labels(program).set(drifted)
            if result in SUCCESS_RESULTS:
                self.last_success.labels(program).set(self._clock())
            if revision is not None:
                old = self._revision.get(program)
                if old is not None and old != revision:
                    self.revision_info.remove(program, old)
                self.revision_info.labels(program, revision).set(1)
                self._revision[program] = revision
            for status in SYNC_STATUSES:
                self.sync_status.labels(program, status).set(1 if status == sync else 0)

    def suspended_set(self, program: str, suspended: bool) -> None:
        """Record that reconciling `program` was suspended (True) or resumed (False)."""
        with self._lock:
            self._touch_program(program)
            self.suspended.labels(program).set(1 if suspended else 0)

    def morph_event(self, program: str, vm: str, outcome: str) -> None:
        """Count one morph event on `vm` of `program`."""
        outcome = _label(outcome, MORPH_OUTCOMES, "morph outcome")
        with self._lock:
            self._touch_program(program)
            if (program, vm) not in self._known_vms:
                # Every outcome exists from the VM's first event, so rate() and increase() see the first
                # `failed` as a step up from 0 rather than a series appearing from nothing.
                self._known_vms.add((program, vm))
                for o in MORPH_OUTCOMES:
                    self.morph_events.labels(program, vm, o)
            self.morph_events.labels(program, vm, outcome).inc()

    def sampled(self, seconds: float) -> None:
        """Record how long one monitoring round took."""
        self.monitor_sample.observe(seconds)

    def forget(self, program: str) -> None:
        """Drop every series of `program` (it is no longer in the repository), so its last values do not
        linger on dashboards and alerts."""
        with self._lock:
            if program not in self._known_programs:
                return
            self._known_programs.discard(program)
            for result in RESULTS:
                self._remove(self.reconcile_duration, program, result)
                self._remove(self.reconciles, program, result)
            for action in ACTIONS:
                self._remove(self.changes_applied, program, action)
            for status in SYNC_STATUSES:
                self._remove(self.sync_status, program, status)
            for metric in (self.rollbacks, self.drifted_vms, self.last_success, self.suspended):
                self._remove(metric, program)
            old = self._revision.pop(program, None)
            if old is not None:
                self._remove(self.revision_info, program, old)
            for p, vm in [k for k in self._known_vms if k[0] == program]:
                self._known_vms.discard((p, vm))
                for o in MORPH_OUTCOMES:
                    self._remove(self.morph_events, program, vm, o)

    # ------------------------------------------------------------------------------------ exposure

    def render(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format, and its content type."""
        with self._lock:
            return generate_latest(_WithoutCreated(self.registry)), CONTENT_TYPE_LATEST

    # ------------------------------------------------------------------------------------- helpers

    def _touch_program(self, program: str) -> None:
        # Counters of a program exist at 0 from the first time it is seen: an alert on
        # increase(vmflow_reconciles_total{result="failed"}[1h]) must work for the first failure too.
        if program in self._known_programs:
            return
        self._known_programs.add(program)
        for result in RESULTS:
            self.reconciles.labels(program, result)
        for action in ACTIONS:
            self.changes_applied.labels(program, action)
        self.rollbacks.labels(program)

    @staticmethod
    def _remove(metric, *labels: str) -> None:
        # Some prometheus_client versions raise KeyError for a label set that is not there.
        try:
            metric.remove(*labels)
        except KeyError:
            pass


class _WithoutCreated:
    """The registry's metrics without the `_created` sample prometheus_client adds to each counter and
    histogram series. In the classic text format that sample becomes a gauge of its own, doubling the
    series count (two per VM and morph outcome) for a timestamp Prometheus does not use there. Filtering
    here, rather than with prometheus_client's process-wide switch, leaves other registries alone."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self):
        for metric in self._registry.collect():
            if metric.type in ("counter", "histogram"):
                metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric
