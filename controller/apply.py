"""apply(plan) -> ApplyResult: execute a Plan, never the desired state.

Every change is checked before the first mutation. Then, change by change:

  create          journal intent → make disks → define → start → verify
  update (live)   snapshot → journal intent → set vCPUs / memory, attach / detach disks and NICs, live and
                  in the config → verify
  update (restart) snapshot → journal intent → graceful shutdown → define the inactive config edited into the
                  new one (same UUID, MACs and data disks; a new boot overlay for an OS swap) → start → verify
  replace         delete, then create
  delete          journal intent → stop → undefine

"Verify" re-observes the VM (vCPUs, memory, disks, NICs, running) and runs its declared health check
(`agent`, `port(N)`, `app("x") running`) through the guest agent; on libvirt's test driver, which has no
guest, health is "running". With a `stability` window (the run-time morphs use one; repository applies do
not, unless asked), the health check is then run again every `stability_interval` seconds until the window
has passed, and a failure inside it counts as a failed verification. Disk files come from the image
repository (controller/images_repo.py).

A failed step or verification reverts the VM to its snapshot (a create is undefined), re-verifies, and
reports "rolled back"; the apply goes on with the other VMs and always returns the partial result. A run
killed half-way leaves journal intents without an outcome: `recover` rolls those back (creates and updates)
or finishes them (deletes) on the next run, and says which.

CPU changes on a running VM only change the vCPUs that are online, up to the maximum the VM was defined
with (its bound): on QEMU a snapshot taken after a live vCPU hotplug cannot be reverted, so vmflow
defines every VM with its bound as the maximum from the start and grows within it, and takes the snapshot
before the hotplug. A rollback after a hotplug still has to load that snapshot into a process that has more
vCPUs than it had: `Hypervisor.revert` then restarts the process from the snapshot.
"""

from __future__ import annotations

import threading
import time
import uuid as uuidlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable

from controller import domain_xml
from controller.hypervisor import Hypervisor, HypervisorError
from controller.images_repo import ImageError, ImageRepo
from controller.plan import Action, Change, Plan, Reason
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


def _state_problems(got: VmState | None, want: VmState) -> list[str]:
    if got is None:
        return [f"`{want.name}` is not there after the change"]
    problems = []
    if not got.running:
        problems.append("not running")
    if got.vcpus != want.vcpus:
        problems.append(f"{got.vcpus} vCPUs, expected {want.vcpus}")
    if got.max_vcpus != want.max_vcpus:
        problems.append(f"at most {got.max_vcpus} vCPUs, expected {want.max_vcpus}")
    if got.memory_kib != want.memory_kib:
        problems.append(f"{got.memory_kib} KiB of memory, expected {want.memory_kib}")
    if got.image != want.image:
        problems.append(f"image {got.image}, expected {want.image}")
    for what, a, b in (("disks", got.disks, want.disks), ("NICs", got.nics, want.nics)):
        if sorted(x.name for x in a) != sorted(x.name for x in b):
            problems.append(f"{what} {sorted(x.name for x in a)}, expected {sorted(x.name for x in b)}")
    return problems


def _verify(hv: Hypervisor, want: VmState, health: tuple[str, object] | None = None,
            health_timeout: float = 20.0, settle: float = 10.0) -> None:
    """Check the VM's health, then re-observe it and check what the change promised. Health first: it
    waits for the guest to boot, and a booting guest reports its balloon size only once its driver loads.
    Live changes reach the live XML through the guest: give them `settle` seconds to show.

    Without a declared check, health is "running", which the observation shows too: one read of the domain
    then serves both (a create of many VMs verifies each one)."""
    kind, arg = health or (None, None)
    got = None
    if kind in (None, "none"):
        got = hv.observe_vm(want.name)
        if got is None:
            raise VerifyError(f"`{want.name}` is not there after the change")
        if not got.running:
            raise VerifyError(f"`{want.name}` is not healthy after the change: not running")
    else:
        if not hv.exists(want.name):
            raise VerifyError(f"`{want.name}` is not there after the change")
        sick = hv.health(want.name, kind, arg, check_timeout=health_timeout)
        if sick:
            raise VerifyError(f"`{want.name}` is not healthy after the change: {sick}")
    deadline = time.monotonic() + (settle if hv.capabilities.guest_agent else 0)
    while True:
        problems = _state_problems(got if got is not None else hv.observe_vm(want.name), want)
        got = None
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if problems:
        raise VerifyError(f"`{want.name}` after the change: " + ", ".join(problems))


def _with_revision(vm: VmState, revision: str | None) -> VmState:
    if vm.owner is None:
        return vm
    return replace(vm, owner=replace(vm.owner, revision=revision))


class Applier:
    def __init__(self, hv: Hypervisor, store: Store, *, revision: str | None = None, keep_snapshots: int = 3,
                 progress: Callable[[str], None] = lambda _m: None, saved: Callable[[], None] = lambda: None,
                 images: ImageRepo | None = None, health: dict[str, tuple[str, object]] | None = None,
                 health_timeout: float = 20.0, parallelism: int = 1, stability: float = 0.0,
                 stability_interval: float = 5.0, sleep: Callable[[float], None] = time.sleep) -> None:
        self.hv = hv
        # Independent VMs are changed this many at a time (QEMU start-up dominates a create); deletes run
        # last, one by one. Journal writes and state saves are serialised by the locks below.
        self.parallelism = max(1, parallelism)
        self._save_lock = threading.Lock()
        self.images = images  # None: no disk files are made (the XML names paths nothing reads)
        self.health = health or {}  # vm name -> (kind, arg) of its declared health check
        self.health_timeout = health_timeout
        # After the first verification, the health check runs again every `stability_interval` seconds for
        # `stability` seconds: a change that breaks the VM a little later is rolled back like one that fails
        # at once. `sleep` waits between checks (a simulation passes one that only moves its clock).
        self.stability = max(0.0, stability)
        self.stability_interval = max(0.1, stability_interval)
        self._sleep = sleep
        self.store = store
        self.revision = revision
        self.keep = keep_snapshots
        self.progress = progress
        self._saved = saved  # called after every settled change (the embedded default persists its state)
        # Set by a SIGTERM handler: the change in flight finishes (or rolls back), the rest are not started,
        # so the journal never holds an intent the process walked away from.
        self.stopping = threading.Event()

    # -- recovery
    def recover(self) -> list[str]:
        """Settle what a killed run left half-done: roll back creates and updates, finish deletes."""
        said = []
        for e in self.store.unfinished():
            name = e.address.split(".", 1)[1]
            try:
                if e.op == "create":
                    self._remove_domain(name)
                    self._remove_files(name)
                    said.append(f"{e.address}: an interrupted create was rolled back")
                elif e.op == "delete":
                    self._remove_domain(name)
                    said.append(f"{e.address}: an interrupted delete was finished")
                elif e.snapshot and self.hv.exists(name) and self.hv.has_snapshot(name, e.snapshot):
                    self.hv.revert(name, e.snapshot)
                    if e.op == "update-restart" or not self._running(name):
                        self._ensure_running(name)
                    self._forget_unused(name)  # what the killed change made
                    said.append(f"{e.address}: an interrupted {e.op} was rolled back to snapshot {e.snapshot}")
                else:
                    if self.hv.exists(name):
                        self._forget_unused(name)  # a file the change made before it was killed
                    said.append(f"{e.address}: an interrupted {e.op} left nothing to undo")
                self.store.settle(e.id, "undone", "recovered on the next run")
            except HypervisorError as err:
                self.store.settle(e.id, "failed", f"recovery failed: {err}")
                said.append(f"{e.address}: recovery of an interrupted {e.op} failed: {err}")
            self.saved()
        return said

    def saved(self) -> None:
        with self._save_lock:
            self._saved()

    def _running(self, name: str) -> bool:
        vm = self.hv.observe_vm(name)
        return bool(vm and vm.running)

    def _ensure_running(self, name: str) -> None:
        if not self._running(name):
            self.hv.start(name)

    # -- apply
    def apply(self, plan: Plan, program: str, *, recover: bool = True, note: dict | None = None) -> ApplyResult:
        """Apply every change of `plan`. `recover` first settles what a killed run left in the journal; a
        caller that runs several appliers at once (the run-time morphs) recovers once itself, since one
        applier's recovery would roll back another's change in flight. `note` is added to the history's
        summary (what the apply was for)."""
        if not plan.applyable:
            raise ApplyRefused("; ".join(f"{p.address}: {p.message}" for p in plan.problems))
        self._precheck(plan)
        apply_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuidlib.uuid4().hex[:6]
        result = ApplyResult(apply_id, recovered=self.recover() if recover else [])
        self.store.begin_apply(apply_id, program, self.revision)
        order = sorted(plan.actionable, key=lambda c: (c.action is Action.DELETE, c.address))
        first = [c for c in order if c.action is not Action.DELETE]
        deletes = [c for c in order if c.action is Action.DELETE]
        if self.parallelism > 1 and len(first) > 1:
            with ThreadPoolExecutor(self.parallelism) as pool:
                result.outcomes.extend(pool.map(lambda c: self._run(c, apply_id), first))
        else:
            result.outcomes.extend(self._run(c, apply_id) for c in first)
        result.outcomes.extend(self._run(c, apply_id) for c in deletes)
        self.store.end_apply(apply_id, "ok" if result.ok else "partial", {
            **(note or {}),
            "counts": result.counts(),
            "changes": [{"address": o.address, "action": o.action.value, "result": o.result,
                         "seconds": round(o.seconds, 3), "detail": o.detail} for o in result.outcomes]})
        return result

    def _run(self, change: Change, apply_id: str) -> Outcome:
        if self.stopping.is_set():
            return Outcome(change.address, change.action, "not-started", 0.0, "vmflow was asked to stop")
        t = time.perf_counter()
        self.progress(f"{change.action.symbol} {change.address}: {change.action.value}…")
        try:
            self._one(change, apply_id)
            outcome = Outcome(change.address, change.action, "applied", time.perf_counter() - t)
        except _RolledBack as rb:
            outcome = Outcome(change.address, change.action, "rolled-back", time.perf_counter() - t, str(rb))
        except (HypervisorError, VerifyError, ImageError) as err:
            outcome = Outcome(change.address, change.action, "failed", time.perf_counter() - t, str(err))
        self.progress(f"  {change.address}: {outcome.result} in {outcome.seconds:.2f}s" +
                      (f": {outcome.detail}" if outcome.detail else ""))
        self.saved()
        return outcome

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
            if c.action is Action.UPDATE_RESTART and self.hv.capabilities.guest_agent:
                # The restart loses the memory state anyway: snapshot the stopped VM. Such a snapshot
                # reverts in milliseconds and, unlike a running one taken after a vCPU hotplug, always loads.
                self.hv.shutdown(name)
                try:
                    self.hv.snapshot(name, snapshot)
                except HypervisorError:
                    self._ensure_running(name)
                    raise
            else:
                self.hv.snapshot(name, snapshot)
            self.saved()  # the snapshot must outlive this process before the journal can name it
            entry = self.store.intent(apply_id, c.address, c.action.value, snapshot, None)
            want = _with_revision(c.after, self.revision)
            try:
                if c.action is Action.UPDATE_LIVE:
                    self._live(name, c.before, want)
                else:
                    self._restart(name, c, want)
                self._verify(want)
            except (HypervisorError, VerifyError, ImageError) as err:
                self._rollback(name, snapshot, entry, err)
            self.store.settle(entry, "done")
            self._prune_snapshots(name)

    def _verify(self, want: VmState) -> None:
        _verify(self.hv, want, self.health.get(want.name), self.health_timeout)
        self._stable(want)

    def _stable(self, want: VmState) -> None:
        """The stability window: the health check again every `stability_interval` seconds until
        `stability` seconds have passed (counted in the intervals slept, so a simulated sleep makes a
        simulated window). Asked to stop, the window ends early: the change was verified once and is kept."""
        kind, arg = self.health.get(want.name) or (None, None)
        left = self.stability
        while left > 1e-9 and not self.stopping.is_set():
            step = min(self.stability_interval, left)
            self._sleep(step)
            left -= step
            # One try per check: the guest was healthy a moment ago, so the agent answers or something broke.
            sick = self.hv.health(want.name, kind, arg, boot_timeout=self.health_timeout, check_timeout=0)
            if sick:
                raise VerifyError(f"`{want.name}` became unhealthy {self.stability - left:.0f}s after the change: "
                                  f"{sick}")

    def _live(self, name: str, before: VmState, want: VmState) -> None:
        """vCPUs, memory and devices on the running VM and in its config (the config alone when stopped)."""
        hv = self.hv
        if before.vcpus != want.vcpus:
            hv.set_vcpus(name, want.vcpus, live=before.running)
        if before.memory_kib != want.memory_kib:
            hv.set_memory(name, want.memory_kib, live=before.running)
        if hv.capabilities.device_hotplug:
            have_disks = {d.name for d in before.disks}
            want_disks = {d.name for d in want.disks}
            for d in before.disks:
                if d.name not in want_disks:
                    hv.detach_disk(name, d.name)
            for d in want.disks:
                if d.name not in have_disks:
                    path = (self.images.data_disk(name, d) if self.images
                            else d.source or f"/var/lib/vmflow/{name}-{d.name}.qcow2")
                    hv.attach_device(name, domain_xml.disk_xml(path, domain_xml.free_target(hv.xml(name)), d.name))
            wanted = {n.name: n for n in want.nics}
            for n in before.nics:
                if n.name not in wanted and n.mac:
                    hv.detach_nic(name, n.mac)
                elif n.name in wanted and n.mac:
                    w = wanted[n.name]
                    if (w.network, w.bridge, w.model) != (n.network, n.bridge, n.model):
                        hv.update_device(name, domain_xml.nic_xml(replace(w, mac=n.mac)))
            have_nics = {n.name for n in before.nics}
            for n in domain_xml.nic_order(before, want):
                if n.name not in have_nics:
                    hv.attach_device(name, domain_xml.nic_xml(n))
        # Hot-plugged NICs are appended: the record names interfaces by position.
        hv.set_owner(name, domain_xml.ownership_metadata(replace(want, nics=domain_xml.nic_order(before, want))))
        self._ensure_running(name)

    def _restart(self, name: str, c: Change, want: VmState) -> None:
        """Graceful shutdown, then the domain's own inactive config edited into the new one: UUID, MACs,
        data disks and anything other tools added stay. An OS swap gets a new overlay on the new image."""
        hv = self.hv
        before = c.before
        swap = Reason.IMAGE in c.reasons or before.image != want.image
        boot_disk = boot = None
        if swap and self.images:
            boot_disk = self.images.boot_disk(name, want.image)
            boot = self.images.boot(want.image)
        have_disks = {d.name for d in before.disks}
        disk_paths = {d.name: self.images.data_disk(name, d) for d in want.disks
                      if d.name not in have_disks} if self.images else {}
        hv.shutdown(name)
        hv.define(domain_xml.update(hv.xml(name, inactive=True), before, want, boot_disk=boot_disk, boot=boot,
                                    disk_paths=disk_paths))
        hv.start(name)

    def _delete(self, name: str, address: str, apply_id: str) -> None:
        entry = self.store.intent(apply_id, address, "delete", None, None)
        try:
            self._remove_domain(name)  # already gone (a recovered run finished it) counts as done
        except HypervisorError as err:
            self.store.settle(entry, "failed", str(err))
            raise
        self._remove_files(name)
        self.store.settle(entry, "done")

    def _remove_domain(self, name: str) -> None:
        """Stop and undefine a domain, if it is there at all."""
        if self.hv.exists(name):
            self.hv.stop(name)
            self.hv.undefine(name)

    def _remove_files(self, name: str) -> None:
        """A VM that is gone takes its folder of disk files with it (never the image root's). Failing here
        costs disk space, not correctness: it is said, and the VM's outcome stands."""
        if self.images is not None:
            try:
                for f in self.images.remove_vm(name):
                    self.progress(f"  removed {f}")
            except ImageError as e:
                self.progress(f"  could not remove the disk files of {name}: {e}")

    def _forget_unused(self, name: str) -> None:
        """Delete the files in the VM's folder that the domain and its snapshots no longer name: an old
        overlay whose snapshots were pruned, a detached disk, what a rolled-back change made. As above,
        a failure costs disk space and is said; the next change tries again."""
        if self.images is None:
            return
        try:
            for f in self.images.forget_unused(name, self.hv.disk_files(name)):
                self.progress(f"  removed {f}")
        except (HypervisorError, ImageError) as e:
            self.progress(f"  could not remove the unused disk files of {name}: {e}")

    def _create(self, want: VmState, apply_id: str) -> None:
        want = _with_revision(want, self.revision)
        entry = self.store.intent(apply_id, f"vm.{want.name}", "create", None, None)
        try:
            self.hv.define(self._render(want))
            self.hv.start(want.name)
            self._verify(want)
        except (HypervisorError, VerifyError, ImageError) as err:
            try:
                self._remove_domain(want.name)
            except HypervisorError as undo:
                self.store.settle(entry, "failed", f"{err}; undoing it failed too: {undo}")
                raise
            self._remove_files(want.name)
            self.store.settle(entry, "undone", str(err))
            raise _RolledBack(f"{err}; the new VM was removed") from None
        self.store.settle(entry, "done")

    def _render(self, want: VmState) -> str:
        """A new VM's domain XML, with its disk files made first (a boot overlay, one file per data disk)."""
        if self.images is None:
            return domain_xml.render(want, domain_type=self.hv.domain_type)
        repo = self.images
        return domain_xml.render(
            want, domain_type=self.hv.domain_type, boot_disk=repo.boot_disk(want.name, want.image),
            disk_paths={d.name: repo.data_disk(want.name, d) for d in want.disks}, boot=repo.boot(want.image),
            serial_log=repo.serial_log(want.name) if self.hv.domain_type != "test" else None)

    def _rollback(self, name: str, snapshot: str, entry: int, err: Exception) -> None:
        try:
            how = self.hv.revert(name, snapshot)
            self._ensure_running(name)
        except HypervisorError as undo:
            self.store.settle(entry, "failed", f"{err}; reverting to {snapshot} failed too: {undo}")
            raise HypervisorError("rollback", f"{err}; reverting to {snapshot} failed too: {undo}") from None
        self.store.settle(entry, "undone", str(err))
        self._forget_unused(name)  # the change's new overlay and data disks
        raise _RolledBack(f"{err}; reverted to snapshot {snapshot}" + (f" ({how})" if how else ""))

    def _prune_snapshots(self, name: str) -> None:
        """Keep the newest `keep` vmflow snapshots of a VM; older ones only cost disk space."""
        vm = self.hv.observe_vm(name, snapshots=True)
        if vm is None:
            return
        ours = sorted(s for s in vm.snapshots if s.startswith(SNAPSHOT_PREFIX))
        # The change is applied by now: pruning that fails costs disk space, not correctness.
        try:
            for old in ours[: max(len(ours) - self.keep, 0)]:
                self.hv.delete_snapshot(name, old)
        except HypervisorError as err:
            self.progress(f"  could not delete old snapshots of {name}: {err}")
        self._forget_unused(name)


class _RolledBack(Exception):
    pass
