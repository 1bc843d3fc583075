"""apply(plan) -> ApplyResult: execute a Plan, never the desired state.

Every change is checked before the first mutation. Then, change by change:

  create          journal intent → define → start → verify
  update (live)   snapshot → journal intent → set vCPUs / memory live and in the config → verify
  update (restart) snapshot → journal intent → stop → define the new config (same UUID) → start → verify
  replace         delete, then create
  delete          journal intent → stop → undefine

A failed step or verification reverts the VM to its snapshot (a create is undefined), re-verifies, and
reports "rolled back"; the apply goes on with the other VMs and always returns the partial result. A run
killed half-way leaves journal intents without an outcome: `recover` rolls those back (creates and updates)
or finishes them (deletes) on the next run, and says which.

CPU changes on a running VM only change the vCPUs that are online, up to the maximum the VM was defined
with (its bound): on QEMU a snapshot taken after a live vCPU hotplug cannot be reverted, so vmflow
defines every VM with its bound as the maximum from the start and grows within it.
"""

from __future__ import annotations

import time
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Callable

from controller import domain_xml
from controller.hypervisor import Hypervisor, HypervisorError
from controller.plan import Action, Change, Plan
from controller.state import VmState
from controller.store import Store

SNAPSHOT_PREFIX = "vmflow-"


class ApplyRefused(Exception):
    """The plan cannot be applied as it is; nothing was changed."""


@dataclass
class Outcome:
    address: str
    action: Action
    result: str  # applied | rolled-back | failed
    seconds: float
    detail: str | None = None


@dataclass
class ApplyResult:
    apply_id: str
    outcomes: list[Outcome] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.result == "applied" for o in self.outcomes)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.outcomes:
            out[o.result] = out.get(o.result, 0) + 1
        return out


class VerifyError(Exception):
    pass


def _verify(hv: Hypervisor, want: VmState) -> None:
    """Re-observe the VM and check what the change promised."""
    got = hv.observe().vms.get(want.name)
    if got is None:
        raise VerifyError(f"`{want.name}` is not there after the change")
    problems = []
    if not got.running:
        problems.append("not running")
    if got.vcpus != want.vcpus:
        problems.append(f"{got.vcpus} vCPUs, expected {want.vcpus}")
    if got.max_vcpus != want.max_vcpus:
        problems.append(f"at most {got.max_vcpus} vCPUs, expected {want.max_vcpus}")
    if got.memory_kib != want.memory_kib:
        problems.append(f"{got.memory_kib} KiB of memory, expected {want.memory_kib}")
    if problems:
        raise VerifyError(f"`{want.name}` after the change: " + ", ".join(problems))


def _with_revision(vm: VmState, revision: str | None) -> VmState:
    if vm.owner is None:
        return vm
    from dataclasses import replace

    return replace(vm, owner=replace(vm.owner, revision=revision))


class Applier:
    def __init__(self, hv: Hypervisor, store: Store, *, revision: str | None = None, keep_snapshots: int = 3,
                 progress: Callable[[str], None] = lambda _m: None, saved: Callable[[], None] = lambda: None) -> None:
        self.hv = hv
        self.store = store
        self.revision = revision
        self.keep = keep_snapshots
        self.progress = progress
        self.saved = saved  # called after every settled change (the embedded default persists its state)

    # -- recovery
    def recover(self) -> list[str]:
        """Settle what a killed run left half-done: roll back creates and updates, finish deletes."""
        said = []
        for e in self.store.unfinished():
            name = e.address.split(".", 1)[1]
            try:
                if e.op == "create":
                    if self.hv.exists(name):
                        self.hv.stop(name)
                        self.hv.undefine(name)
                    said.append(f"{e.address}: an interrupted create was rolled back")
                elif e.op == "delete":
                    if self.hv.exists(name):
                        self.hv.stop(name)
                        self.hv.undefine(name)
                    said.append(f"{e.address}: an interrupted delete was finished")
                elif e.snapshot and self.hv.exists(name) and self.hv.has_snapshot(name, e.snapshot):
                    self.hv.revert(name, e.snapshot)
                    if e.op == "update-restart" or not self._running(name):
                        self._ensure_running(name)
                    said.append(f"{e.address}: an interrupted {e.op} was rolled back to snapshot {e.snapshot}")
                else:
                    said.append(f"{e.address}: an interrupted {e.op} left nothing to undo")
                self.store.settle(e.id, "undone", "recovered on the next run")
            except HypervisorError as err:
                self.store.settle(e.id, "failed", f"recovery failed: {err}")
                said.append(f"{e.address}: recovery of an interrupted {e.op} failed: {err}")
            self.saved()
        return said

    def _running(self, name: str) -> bool:
        vm = self.hv.observe().vms.get(name)
        return bool(vm and vm.running)

    def _ensure_running(self, name: str) -> None:
        if not self._running(name):
            self.hv.start(name)

    # -- apply
    def apply(self, plan: Plan, program: str) -> ApplyResult:
        if not plan.applyable:
            raise ApplyRefused("; ".join(f"{p.address}: {p.message}" for p in plan.problems))
        self._precheck(plan)
        apply_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuidlib.uuid4().hex[:6]
        result = ApplyResult(apply_id, recovered=self.recover())
        self.store.begin_apply(apply_id, program, self.revision)
        order = sorted(plan.actionable, key=lambda c: (c.action is Action.DELETE, c.address))
        for change in order:
            t = time.perf_counter()
            self.progress(f"{change.action.symbol} {change.address}: {change.action.value}…")
            try:
                self._one(change, apply_id)
                outcome = Outcome(change.address, change.action, "applied", time.perf_counter() - t)
            except _RolledBack as rb:
                outcome = Outcome(change.address, change.action, "rolled-back", time.perf_counter() - t, str(rb))
            except (HypervisorError, VerifyError) as err:
                outcome = Outcome(change.address, change.action, "failed", time.perf_counter() - t, str(err))
            result.outcomes.append(outcome)
            self.progress(f"  {outcome.result} in {outcome.seconds:.2f}s" +
                          (f": {outcome.detail}" if outcome.detail else ""))
            self.saved()
        self.store.end_apply(apply_id, "ok" if result.ok else "partial", result.counts())
        return result

    def _precheck(self, plan: Plan) -> None:
        """Everything apply will need, checked before the first mutation."""
        for c in plan.actionable:
            name = c.address.split(".", 1)[1]
            exists = self.hv.exists(name)
            if c.action is Action.CREATE and exists:
                raise ApplyRefused(f"{c.address} already exists: the plan is stale, plan again")
            if c.action is not Action.CREATE and not exists:
                raise ApplyRefused(f"{c.address} no longer exists: the plan is stale, plan again")

    def _one(self, c: Change, apply_id: str) -> None:
        name = c.address.split(".", 1)[1]
        snapshot = f"{SNAPSHOT_PREFIX}{apply_id}"
        if c.action is Action.CREATE:
            self._create(c.after, apply_id)
        elif c.action is Action.DELETE:
            self._delete(name, c.address, apply_id)
        elif c.action is Action.REPLACE:
            self._delete(name, c.address, apply_id)
            self._create(c.after, apply_id)
        else:
            self.hv.snapshot(name, snapshot)
            self.saved()  # the snapshot must outlive this process before the journal can name it
            entry = self.store.intent(apply_id, c.address, c.action.value, snapshot, None)
            want = _with_revision(c.after, self.revision)
            try:
                if c.action is Action.UPDATE_LIVE:
                    if c.before.vcpus != want.vcpus:
                        self.hv.set_vcpus(name, want.vcpus, live=c.before.running)
                    if c.before.memory_kib != want.memory_kib:
                        self.hv.set_memory(name, want.memory_kib, live=c.before.running)
                    self.hv.set_owner(name, domain_xml.ownership_metadata(want))
                    self._ensure_running(name)
                else:
                    self.hv.stop(name)
                    self.hv.define(domain_xml.render(want, domain_type=self.hv.domain_type, uuid=c.before.uuid))
                    self.hv.start(name)
                _verify(self.hv, want)
            except (HypervisorError, VerifyError) as err:
                self._rollback(name, snapshot, entry, err)
            self.store.settle(entry, "done")
            self._prune_snapshots(name)

    def _delete(self, name: str, address: str, apply_id: str) -> None:
        entry = self.store.intent(apply_id, address, "delete", None, None)
        try:
            if self.hv.exists(name):  # already gone (a recovered run finished it) counts as done
                self.hv.stop(name)
                self.hv.undefine(name)
        except HypervisorError as err:
            self.store.settle(entry, "failed", str(err))
            raise
        self.store.settle(entry, "done")

    def _create(self, want: VmState, apply_id: str) -> None:
        want = _with_revision(want, self.revision)
        entry = self.store.intent(apply_id, f"vm.{want.name}", "create", None, None)
        try:
            self.hv.define(domain_xml.render(want, domain_type=self.hv.domain_type))
            self.hv.start(want.name)
            _verify(self.hv, want)
        except (HypervisorError, VerifyError) as err:
            try:
                if self.hv.exists(want.name):
                    self.hv.stop(want.name)
                    self.hv.undefine(want.name)
            except HypervisorError as undo:
                self.store.settle(entry, "failed", f"{err}; undoing it failed too: {undo}")
                raise
            self.store.settle(entry, "undone", str(err))
            raise _RolledBack(f"{err}; the new VM was removed") from None
        self.store.settle(entry, "done")

    def _rollback(self, name: str, snapshot: str, entry: int, err: Exception) -> None:
        try:
            self.hv.revert(name, snapshot)
            self._ensure_running(name)
        except HypervisorError as undo:
            self.store.settle(entry, "failed", f"{err}; reverting to {snapshot} failed too: {undo}")
            raise
        self.store.settle(entry, "undone", str(err))
        raise _RolledBack(f"{err}; reverted to snapshot {snapshot}")

    def _prune_snapshots(self, name: str) -> None:
        """Keep the newest `keep` vmflow snapshots of a VM; older ones only cost disk space."""
        vm = self.hv.observe().vms.get(name)
        if vm is None:
            return
        ours = sorted(s for s in vm.snapshots if s.startswith(SNAPSHOT_PREFIX))
        for old in ours[: max(len(ours) - self.keep, 0)]:
            self.hv.delete_snapshot(name, old)


class _RolledBack(Exception):
    pass
