"""reconcile_once(revision): compile → observe → plan → apply → write status. Level-triggered, idempotent.

One `Reconciler` keeps one program (a folder of a git branch) in step with one hypervisor. Each call looks
at the world afresh: the revision to apply, what libvirt holds, what the store says was applied last. Run
twice with nothing changed, the second run plans nothing and changes nothing.

Which revision is applied:
  - the branch head, normally;
  - a pinned revision after `vmflow rollback REV`: the pin holds while the branch head stays where it was
    when the rollback was made, so automatic apply does not undo the rollback; the next commit on the branch
    lifts the pin and is applied as usual (specs/controller.md).

What is never done:
  - a revision that does not compile, is not signed by a trusted key (with signature checking on), or lies
    on history unrelated to the last applied revision (a force-push of another repository) is not applied;
    the last good revision stays in place and the program is Stalled until a new revision arrives;
  - a revision whose apply failed is not applied again in a loop: it waits for a new revision (or a
    rollback, or `vmflow sync`, which retries it once);
  - drift (changes made behind vmflow's back to the revision already applied) is only reported (OutOfSync)
    unless self-heal is on;
  - VMs the program no longer declares are deleted only with prune on, and never when the program fails to
    compile.

Errors are sorted as kopf sorts them: temporary ones (the git remote or libvirt unreachable, the apply lock
held by someone else) raise `TemporaryError` after status is written, and the caller retries with
backoff; permanent ones (the revision itself is bad) leave the program Stalled until a new revision.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from compiler.program import Compilation, Compiler
from compiler.render import as_dict
from compiler.render import summary as render_summary
from controller import context, embedded
from controller.apply import Applier, ApplyResult
from controller.gitsource import GitError, GitSource
from controller.hypervisor import Hypervisor, HypervisorError
from controller.plan import Action, Plan
from controller.state import ActualState
from controller.store import LockHeld, Store

log = logging.getLogger("vmflow.reconcile")

SYNCED, OUT_OF_SYNC, UNKNOWN = "Synced", "OutOfSync", "Unknown"
HEALTHY, PROGRESSING, DEGRADED, MISSING = "Healthy", "Progressing", "Degraded", "Missing"


def control_key(program: str) -> str:
    """The store document holding what operators asked for: suspended, a rollback pin."""
    return f"control:{program}"


class TemporaryError(Exception):
    """Worth retrying with backoff: nothing is wrong with the revision, something is unreachable or busy."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Settings:
    """How one program is reconciled. Every switch that can delete or undo is off by default."""

    self_heal: bool = False  # revert drift on the applied revision
    prune: bool = False  # delete VMs the program no longer declares
    allow_mass_delete: bool = False
    verify_signatures: bool = False
    trusted_keys: Path | None = None
    allow_unrelated_history: bool = False
    keep_snapshots: int = 3
    parallelism: int | None = None
    image_root: Path | None = None
    images: tuple[Path, ...] = ()


@dataclass
class Outcome:
    """What one reconcile did: `result` is synced | noop | failed | stalled | suspended | out-of-sync."""

    result: str
    revision: str | None
    seconds: float
    changes: dict[str, int] = field(default_factory=dict)
    rollbacks: int = 0
    drifted: int = 0
    message: str = ""


def _short(rev: str | None) -> str:
    return rev[:12] if rev else "-"


def new_status(program: str, source: GitSource, uri: str | None, settings: Settings) -> dict:
    return {
        "program": program,
        "source": {"repo": source.repo, "branch": source.branch, "path": source.path},
        "uri": uri,
        "revisions": {"observed": None, "last_applied": None, "last_attempted": None, "failed": None},
        "sync": UNKNOWN,
        "health": MISSING,
        "conditions": [],
        "last_error": None,
        "inventory": [],
        "drift": [],
        "pending": [],
        "suspended": None,
        "pin": None,
        "last_reconcile": None,
        "self_heal": settings.self_heal,
        "prune": settings.prune,
    }


def damaged_status(doc: object) -> str | None:
    """Why a status document read from the store cannot be built on (None: it is absent, or whole enough).
    The status is the controller's own record, rewritten by every reconcile, so a damaged one is replaced
    by a new one rather than read half."""
    if doc is None:
        return None
    if not isinstance(doc, dict):
        return f"it is a JSON {type(doc).__name__}, not an object"
    for key in ("revisions", "source"):
        if not isinstance(doc.get(key), dict):
            return f"`{key}` is missing or not an object"
    if not isinstance(doc.get("conditions"), list) or not all(isinstance(c, dict) for c in doc["conditions"]):
        return "`conditions` is missing or not a list of objects"
    return None


def reset_damaged_status(store: Store, program: str, source: GitSource, uri: str | None, settings: Settings
                         ) -> str | None:
    """Replace a status document that is not JSON or not shaped like one with a new one (and say so in
    the events); returns why it was replaced, or None when it was sound or absent. The revisions it held
    are lost with it: the next reconcile plans against what libvirt holds, so nothing is applied twice."""
    try:
        doc = store.get_status(program)
    except ValueError as e:  # not JSON
        why = f"it is not JSON ({e})"
    else:
        why = damaged_status(doc)
    if why is None:
        return None
    store.put_status(program, new_status(program, source, uri, settings))
    store.add_event(program, None, "reconcile", "recovered", f"the status document was damaged ({why}); "
                    "it was written afresh")
    return why


def set_condition(status: dict, kind: str, value: bool, reason: str, message: str, now: float) -> None:
    """Conditions as Flux writes them: the time only moves when the value or the reason changes."""
    conds = [c for c in status["conditions"] if c["type"] != kind]
    old = next((c for c in status["conditions"] if c["type"] == kind), None)
    since = old["since"] if old and old["status"] == value and old["reason"] == reason else now
    conds.append({"type": kind, "status": value, "reason": reason, "message": message, "since": since})
    status["conditions"] = sorted(conds, key=lambda c: ("Ready", "Reconciling", "Stalled").index(c["type"]))


class Reconciler:
    def __init__(self, source: GitSource, store: Store, state_dir: Path, *, libvirt_uri: str | None = None,
                 settings: Settings | None = None, metrics=None,
                 progress: Callable[[str], None] = lambda _m: None) -> None:
        self.source = source
        self.store = store
        self.state_dir = state_dir
        self.libvirt_uri = libvirt_uri
        self.settings = settings or Settings()
        self.metrics = metrics
        self.progress = progress
        self.program = source.program_name
        self.compiler = Compiler(images=list(self.settings.images))
        self._hv: Hypervisor | None = None
        self._hv_stamp: tuple | None = None
        self.applier: Applier | None = None  # the apply in flight, so a SIGTERM can ask it to stop
        self.stopping = False

    # -- status
    def status(self) -> dict:
        doc = self.store.get_status(self.program)
        if doc is None or damaged_status(doc) is not None:
            doc = new_status(self.program, self.source, self.libvirt_uri, self.settings)
        doc["self_heal"], doc["prune"] = self.settings.self_heal, self.settings.prune
        return doc

    def _write(self, status: dict) -> None:
        self.store.put_status(self.program, status)

    def _event(self, outcome: str, message: str, data: dict | None = None, vm: str | None = None) -> None:
        self.store.add_event(self.program, vm, "reconcile", outcome, message, data)

    # -- the hypervisor, kept open between reconciles
    def hypervisor(self, uri: str) -> Hypervisor:
        """An open connection to `uri`. The embedded default is reopened when its node file changed under
        us (another vmflow process applied, or someone edited the VMs), since the test driver only reads
        that file when a connection opens."""
        stamp = None
        if embedded.is_embedded(uri):
            node = Path(uri[len("test://"):])
            st = node.stat() if node.exists() else None
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino) if st else None
        if self._hv is not None and (self._hv.uri != uri or stamp != self._hv_stamp):
            self.close_hypervisor()
        if self._hv is None:
            try:
                self._hv = Hypervisor(uri)
            except HypervisorError as e:
                raise TemporaryError("HypervisorUnavailable", f"cannot reach {uri}: {e}") from None
            self._hv_stamp = stamp
        return self._hv

    def _saved(self, uri: str) -> None:
        """After a change on the embedded default: persist it, and remember the file as our own."""
        if embedded.is_embedded(uri) and self._hv is not None:
            embedded.save(self.state_dir, self._hv.export())
            st = Path(uri[len("test://"):]).stat()
            self._hv_stamp = (st.st_mtime_ns, st.st_size, st.st_ino)

    def close_hypervisor(self) -> None:
        if self._hv is not None:
            self._hv.close()
            self._hv = None

    def close(self) -> None:
        self.close_hypervisor()

    # -- the loop body
    def reconcile_once(self, revision: str | None = None, trigger: str = "manual", retry_failed: bool = False
                       ) -> Outcome:
        """Bring the program to `revision` (default: the branch head, or the rollback pin)."""
        started = time.monotonic()
        now = time.time()
        status = self.status()
        status["last_reconcile"] = {"at": now, "trigger": trigger, "result": None, "seconds": None}
        health = status.get("health", MISSING)
        try:
            outcome = self._reconcile(status, revision, trigger, retry_failed, now)
        except TemporaryError as e:
            if status.get("health") == PROGRESSING:
                # Cut short after the apply began (libvirt went away while it was observed): no apply runs
                # any more, and what the VMs are is not known until the retry looks again.
                status["health"] = health
            set_condition(status, "Ready", False, e.reason, str(e), now)
            set_condition(status, "Reconciling", False, e.reason, "will retry with backoff", now)
            status["last_error"] = {"at": now, "reason": e.reason, "message": str(e)}
            status["sync"] = status["sync"] if status["revisions"]["last_applied"] else UNKNOWN
            self._finish(status, Outcome("failed", revision, time.monotonic() - started, message=str(e)))
            self._event("retry", f"{e.reason}: {e}")
            raise
        outcome.seconds = time.monotonic() - started
        self._finish(status, outcome)
        return outcome

    def _finish(self, status: dict, outcome: Outcome) -> None:
        status["last_reconcile"].update(result=outcome.result, seconds=round(outcome.seconds, 4),
                                        revision=outcome.revision)
        self._write(status)
        if self.metrics is not None:
            self.metrics.reconciled(self.program, _metric_result(outcome.result), outcome.seconds, outcome.changes,
                                    outcome.rollbacks, outcome.drifted, status["revisions"]["last_applied"],
                                    status["sync"])
            self.metrics.suspended_set(self.program, bool(status.get("suspended")))
        log.info("reconciled", extra={"fields": {
            "program": self.program, "result": outcome.result, "revision": _short(outcome.revision),
            "seconds": round(outcome.seconds, 3), "changes": outcome.changes, "message": outcome.message}})

    def _head(self) -> str:
        try:
            self.source.fetch()
            return self.source.head()
        except GitError as e:
            raise TemporaryError("SourceUnavailable", f"{e}") from None

    def _reconcile(self, status: dict, revision: str | None, trigger: str, retry_failed: bool, now: float
                   ) -> Outcome:
        revs = status["revisions"]
        head = self._head()
        revs["observed"] = head
        control = self.store.get_doc(control_key(self.program), {})
        status["suspended"], status["pin"] = control.get("suspended"), control.get("pin")
        if status.get("suspended"):
            set_condition(status, "Reconciling", False, "Suspended", status["suspended"].get("reason") or
                          "suspended", now)
            return Outcome("suspended", head, 0.0, message="suspended: nothing is applied until `vmflow resume`")
        pin = status.get("pin")
        if pin and revision is None:
            if pin.get("while_head") == head:
                revision = pin["revision"]
            else:
                self._event("unpinned", f"a new commit {_short(head)} arrived on {self.source.branch}: the "
                            f"rollback to {_short(pin['revision'])} is lifted and automatic apply resumes")
                status["pin"] = control["pin"] = None
                self.store.put_doc(control_key(self.program), control)
        rev = revision or head
        try:
            rev = self.source.resolve(rev)
        except GitError as e:
            if e.temporary:
                raise TemporaryError("SourceUnavailable", str(e)) from None
            return self._stall(status, rev, "RevisionNotFound", str(e), now)
        is_new = rev != revs["last_applied"]

        # The revision must be one we may apply at all.
        last = revs["last_applied"]
        if is_new and last and not self.settings.allow_unrelated_history:
            try:
                related = self.source.related(last, rev)
            except GitError as e:
                raise TemporaryError("SourceUnavailable", str(e)) from None
            if not related:
                msg = (f"revision {_short(rev)} shares no history with the applied revision {_short(last)}: the "
                       f"branch was force-pushed with unrelated history. Nothing is applied or deleted; start the "
                       f"controller with --allow-unrelated-history if this is intended")
                raise TemporaryError("UnrelatedHistory", msg)
        if is_new and self.settings.verify_signatures:
            ok, why = self.source.verify(rev, self.settings.trusted_keys)
            if not ok:
                return self._stall(status, rev, "UntrustedRevision", f"revision {_short(rev)} is not applied: {why}",
                                   now)
        if is_new and rev == revs["failed"] and not retry_failed:
            # Tried once and failed: wait for a new revision instead of failing in a loop.
            revision_ok = False
        else:
            revision_ok = True

        try:
            comp = self.source.compile(self.compiler, rev)
        except GitError as e:
            raise TemporaryError("SourceUnavailable", str(e)) from None
        if not comp.ok:
            diags = _diagnostics(comp)
            return self._stall(status, rev, "BuildFailed",
                               f"revision {_short(rev)} does not compile ({render_summary(comp.diagnostics)}); "
                               + (f"revision {_short(last)} stays applied" if last else "nothing was applied"), now, diagnostics=diags)
        try:
            t = context.target(comp, self.program, Path(self.source.path or "."), self.libvirt_uri, self.state_dir,
                               self.settings.image_root)
        except context.ContextError as e:
            return self._stall(status, rev, "InvalidTarget", str(e), now)
        status["uri"] = t.uri
        hv = self.hypervisor(t.uri)
        try:
            self.store.acquire(self.program, "vmflow controller", f"reconcile {_short(rev)} ({trigger})")
        except LockHeld as e:
            raise TemporaryError("LockHeld", str(e)) from None
        try:
            return self._plan_and_apply(status, t, hv, rev, is_new, revision_ok, now)
        except HypervisorError as e:
            self.close_hypervisor()
            if e.temporary:
                raise TemporaryError("HypervisorUnavailable", str(e)) from None
            status["last_error"] = {"at": now, "reason": "HypervisorError", "message": str(e)}
            set_condition(status, "Ready", False, "HypervisorError", str(e), now)
            if any(c["type"] == "Reconciling" and c["status"] for c in status["conditions"]):
                set_condition(status, "Reconciling", False, "HypervisorError", str(e), now)
            return Outcome("failed", rev, 0.0, message=str(e))
        finally:
            self.store.release(self.program)

    def _plan_and_apply(self, status: dict, t: context.Target, hv: Hypervisor, rev: str, is_new: bool,
                        revision_ok: bool, now: float) -> Outcome:
        revs = status["revisions"]
        images = context.image_repo(t, hv)
        self.applier = applier = Applier(
            hv, self.store, revision=rev, keep_snapshots=self.settings.keep_snapshots,
            saved=lambda: self._saved(t.uri), progress=self.progress, images=images, health=t.health,
            parallelism=self.settings.parallelism or (1 if t.embedded else 4))
        try:
            recovered = applier.recover()
            for line in recovered:
                self._event("recovered", line)
            self.store.interrupted_applies(self.program)
            p, actual = context.make_plan(t, hv, self.settings.prune, self.settings.allow_mass_delete)
            drift = [{"address": d.address, "path": d.path, "applied": d.applied, "actual": d.actual}
                     for d in p.drift]
            pending = [c for c in p.actionable]
            # On the revision already applied, anything to change is drift (made behind our back), except
            # deletes: those are the revision's own, held until prune was turned on.
            drifted = sorted({d["address"] for d in drift} |
                             ({c.address for c in pending if c.action is not Action.DELETE} if not is_new else set()))
            status["drift"] = drift
            if not p.applyable:
                msg = "; ".join(f"{pr.address}: {pr.message}" for pr in p.problems)
                return self._stall(status, rev, "PlanRefused", f"revision {_short(rev)} cannot be applied: {msg}",
                                   now, keep_attempted=True)
            if not is_new and not self.settings.self_heal:
                # Without self-heal only the revision's own deletes may run on the applied revision.
                p = dataclasses.replace(p, changes=tuple(c for c in p.changes if c.action is Action.DELETE))
                pending = list(p.actionable)
            apply_now = bool(pending) and (is_new and revision_ok or not is_new)
            if is_new:
                revs["last_attempted"] = rev
            if not apply_now:
                return self._settle_without_apply(status, p, actual, rev, is_new, revision_ok, drifted, now)
            set_condition(status, "Reconciling", True, "Progressing",
                          f"applying {len(pending)} change(s) for {_short(rev)}", now)
            status["health"] = PROGRESSING
            self._write(status)
            what = "revision" if is_new else "self-heal of"
            self._event("applying", f"{what} {_short(rev)}: {len(pending)} change(s)",
                        {"changes": [c.address for c in pending]})
            result = applier.apply(p, self.program)
            return self._after_apply(status, t, hv, p, result, rev, is_new, drifted, now)
        finally:
            self.applier = None

    def _settle_without_apply(self, status, p: Plan, actual: ActualState, rev: str, is_new: bool, revision_ok: bool,
                              drifted: list[str], now: float) -> Outcome:
        revs = status["revisions"]
        pending = [c.address for c in p.actionable]
        held = list(p.held_deletes)
        status["pending"] = pending + [f"vm.{n}" for n in held]
        if is_new and not pending and revision_ok:
            revs["last_applied"] = rev  # nothing to change: this revision is what runs
            revs["failed"] = None
        self._inventory(status, actual, {})
        if not pending and not held and not drifted:
            status["sync"] = SYNCED
            status["last_error"] = None if is_new or not status["last_error"] else status["last_error"]
            set_condition(status, "Ready", True, "ReconciliationSucceeded", f"applied revision {_short(rev)}", now)
            set_condition(status, "Reconciling", False, "ReconciliationSucceeded", "up to date", now)
            set_condition(status, "Stalled", False, "ReconciliationSucceeded", "", now)
            return Outcome("noop", rev, 0.0)
        status["sync"] = OUT_OF_SYNC
        if not revision_ok:
            why = (f"revision {_short(rev)} failed to apply once and is not retried; push a fix, roll back, or run "
                   f"`vmflow sync` to retry it")
            reason = "ApplyFailed"
        elif drifted:
            why = (f"{len(drifted)} VM(s) drifted from revision {_short(rev)}: " + ", ".join(drifted[:10]) +
                   ("" if self.settings.self_heal else "; self-heal is off, so they are reported, not reverted"))
            reason = "DriftDetected"
            self._event("drift", why, {"vms": drifted})
        else:
            why = (f"{len(held)} VM(s) are no longer declared and are kept: prune is off ({', '.join(held[:10])})")
            reason = "PruneRequired"
        set_condition(status, "Ready", False, reason, why, now)
        set_condition(status, "Reconciling", False, reason, why, now)
        return Outcome("out-of-sync", rev, 0.0, drifted=len(drifted), message=why)

    def _after_apply(self, status: dict, t: context.Target, hv: Hypervisor, p: Plan, result: ApplyResult, rev: str,
                     is_new: bool, drifted: list[str], now: float) -> Outcome:
        revs = status["revisions"]
        counts: dict[str, int] = {}
        for o in result.outcomes:
            if o.result == "applied":
                counts[o.action.value] = counts.get(o.action.value, 0) + 1
        rollbacks = sum(1 for o in result.outcomes if o.result == "rolled-back")
        actual = hv.observe(snapshots=False)
        per_vm = {o.address.split(".", 1)[1]: o.result for o in result.outcomes}
        self._inventory(status, context.owned(actual, self.program), per_vm)
        status["drift"] = [] if result.ok else status["drift"]
        status["pending"] = [o.address for o in result.outcomes if o.result != "applied"] + \
            [f"vm.{n}" for n in p.held_deletes]
        if result.ok:
            revs["last_applied"] = rev
            revs["failed"] = None  # a good revision is in place: what failed before is history
            status["last_error"] = None
            status["sync"] = SYNCED if not p.held_deletes else OUT_OF_SYNC
            msg = f"applied revision {_short(rev)}: " + ", ".join(f"{n} {a}" for a, n in sorted(counts.items()))
            set_condition(status, "Ready", True, "ReconciliationSucceeded", msg, now)
            set_condition(status, "Reconciling", False, "ReconciliationSucceeded", "up to date", now)
            set_condition(status, "Stalled", False, "ReconciliationSucceeded", "", now)
            self._event("applied", msg, {"apply_id": result.apply_id, "counts": counts})
            return Outcome("synced", rev, 0.0, counts, rollbacks, len(drifted), msg)
        failed = [o for o in result.outcomes if o.result != "applied"]
        if self.stopping:
            msg = f"stopped during revision {_short(rev)}: {len(failed)} change(s) not started; the next run resumes"
        else:
            revs["failed"] = rev
            msg = (f"revision {_short(rev)}: {len(failed)} of {len(result.outcomes)} change(s) did not apply (" +
                   "; ".join(f"{o.address} {o.result}: {o.detail}" for o in failed[:5]) + ")")
        status["sync"] = OUT_OF_SYNC
        status["last_error"] = {"at": now, "reason": "ApplyFailed", "message": msg}
        set_condition(status, "Ready", False, "ApplyFailed", msg, now)
        set_condition(status, "Reconciling", False, "ApplyFailed", msg, now)
        self._event("failed", msg, {"apply_id": result.apply_id})
        return Outcome("failed", rev, 0.0, counts, rollbacks, len(drifted), msg)

    def _inventory(self, status: dict, actual: ActualState, results: dict[str, str]) -> None:
        inv = []
        for name, vm in sorted(actual.vms.items()):
            r = results.get(name)
            health = HEALTHY if vm.running else DEGRADED
            if r in ("rolled-back", "failed"):
                health = DEGRADED
            inv.append({"name": name, "uuid": vm.uuid, "running": vm.running, "vcpus": vm.vcpus,
                        "memory_kib": vm.memory_kib, "image": vm.image, "health": health,
                        "revision": vm.owner.revision if vm.owner else None,
                        "morphs": list(vm.owner.morphs) if vm.owner else []})
        status["inventory"] = inv
        if not inv:
            status["health"] = MISSING
        elif any(v["health"] == DEGRADED for v in inv):
            status["health"] = DEGRADED
        else:
            status["health"] = HEALTHY

    def _stall(self, status: dict, rev: str, reason: str, message: str, now: float, diagnostics=None,
               keep_attempted: bool = False) -> Outcome:
        revs = status["revisions"]
        revs["last_attempted"] = rev
        if rev != revs["last_applied"]:
            revs["failed"] = rev
        status["last_error"] = {"at": now, "reason": reason, "message": message, "revision": rev,
                                "diagnostics": diagnostics or []}
        set_condition(status, "Ready", False, reason, message, now)
        set_condition(status, "Reconciling", False, reason, message, now)
        set_condition(status, "Stalled", True, reason, message, now)
        self._event("stalled", message, {"reason": reason, "revision": rev})
        return Outcome("stalled", rev, 0.0, message=message)


def _diagnostics(comp: Compilation) -> list[dict]:
    """Diagnostics as the status document carries them: the shape `vmflow validate -f json` prints."""
    return [as_dict(d, comp.sources) for d in comp.diagnostics[:50]]


def _metric_result(result: str) -> str:
    """The metrics' coarser result: a reconcile that applied nothing (in sync, drift reported, suspended)
    is a noop."""
    return {"synced": "synced", "stalled": "stalled", "failed": "failed"}.get(result, "noop")
