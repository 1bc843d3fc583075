"""plan(desired, actual) -> Plan: a pure function, no I/O and no clock.

It pairs VMs by name. Missing from actual: create. Owned and missing from desired: delete, only with
`prune` (and never more than `mass_delete_share` of the owned VMs without `allow_mass_delete`). Present
on both sides: the differences, each classed by what applying it costs:

  ~  update live     within the hypervisor maxima: vCPUs up to max, balloon up to max memory, devices
  ~! update restart  maxima, the boot image (OS swap keeps UUID, MACs and data disks): stop, redefine, start
  -/+ replace        what cannot be changed in place (moving to another pool)
  +  create, - delete

Each change carries machine-readable reasons (specs/plan.md lists them) and the attribute paths that force
a restart or a replacement. Differences that active morphs explain are accepted while the base the program
last applied is unchanged; otherwise the VM goes back to the desired base and its morphs are dropped
(`morphs-reset`, specs/morphs.md). Drift, where actual differs from what vmflow last applied, is reported
separately. A plan never promises what apply would refuse: capacity and maxima are checked here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum

from controller import morph
from controller.state import ActualState, VmState


class Action(str, Enum):
    CREATE = "create"
    UPDATE_LIVE = "update-live"
    UPDATE_RESTART = "update-restart"
    REPLACE = "replace"
    DELETE = "delete"
    NOOP = "no-op"

    @property
    def symbol(self) -> str:
        return {"create": "+", "update-live": "~", "update-restart": "~!", "replace": "-/+", "delete": "-",
                "no-op": " "}[self.value]


class Reason(str, Enum):
    NOT_FOUND = "not-found"                      # create: no such domain
    REMOVED_FROM_PROGRAM = "removed-from-program"  # delete: owned, no longer declared
    CPU_LIVE = "cpu-live"                        # vCPUs change within the current maximum
    CPU_MAX = "cpu-max"                          # the vCPU maximum (the bound) changes
    CPU_UNPLUG = "cpu-unplug"                    # fewer vCPUs on a running VM whose hypervisor cannot unplug live
    MEMORY_LIVE = "memory-live"                  # balloon target changes within the maximum
    MEMORY_MAX = "memory-max"                    # the memory maximum (the bound) changes
    IMAGE = "image"                              # a new boot image: OS swap
    DISK_ADD = "disk-add"
    DISK_REMOVE = "disk-remove"
    DISK_RESIZE = "disk-resize"
    NIC_ADD = "nic-add"
    NIC_REMOVE = "nic-remove"
    NIC_CHANGE = "nic-change"
    NO_HOTPLUG = "no-hotplug"                    # live would do, but the driver cannot hotplug devices
    POOL = "pool"                                # moving to another pool (host)
    NOT_RUNNING = "not-running"                  # the domain is defined but stopped: start it
    MORPHED = "morphed"                          # no-op: differs from the base by allowed, active morphs
    MORPHS_RESET = "morphs-reset"                # back to the (new) base: the active morphs are dropped


@dataclass(frozen=True)
class Change:
    address: str
    action: Action
    before: VmState | None
    after: VmState | None
    reasons: tuple[Reason, ...]
    restart_paths: tuple[str, ...] = ()
    replace_paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class Drift:
    """Actual differs from what vmflow last applied, without a morph to explain it."""

    address: str
    path: str
    applied: object
    actual: object


@dataclass(frozen=True)
class Problem:
    """Something that makes the plan impossible to apply as is (apply refuses it too)."""

    address: str
    message: str


@dataclass(frozen=True)
class Options:
    prune: bool = False
    allow_mass_delete: bool = False
    mass_delete_share: float = 0.5
    device_hotplug: bool = True  # False on libvirt's test driver
    # False on QEMU: a live vCPU unplug times out there, so fewer vCPUs on a running VM is a restart with
    # the new count in its config (HYPERVISOR.md). The test driver pretends to unplug.
    cpu_unplug: bool = True
    pools: dict = field(default_factory=dict)  # name -> (cpu, memory_kib) capacity, None for unlimited


@dataclass(frozen=True)
class Plan:
    changes: tuple[Change, ...]
    drift: tuple[Drift, ...]
    problems: tuple[Problem, ...]
    held_deletes: tuple[str, ...] = ()  # owned VMs not declared any more, kept
    held_because: str = "no-prune"  # "no-prune" | "mass-delete": why they are kept

    @property
    def applyable(self) -> bool:
        return not self.problems

    @property
    def actionable(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.action is not Action.NOOP)

    def counts(self) -> dict[str, int]:
        out = {a.value: 0 for a in Action}
        for c in self.changes:
            out[c.action.value] += 1
        return out


def _diff_vm(want: VmState, have: VmState, opts: Options) -> Change:
    """One VM's change. Differences that active morphs explain are accepted (a no-op, `morphed`) while the
    base the repository last applied is still the desired one; otherwise the VM goes to the desired base,
    its morphs are dropped (the desired state records none) and the change says `morphs-reset`."""
    if not (have.owner and have.owner.morphs):
        return _compare(want, have, opts, honour_morphs=False)
    kept = _compare(want, have, opts, honour_morphs=True)
    if kept.action is Action.NOOP and not morph.base_changed(want, have):
        return replace(kept, reasons=(Reason.MORPHED,))
    reset = _compare(want, have, opts, honour_morphs=False)
    reasons = list(reset.reasons)
    restart = list(reset.restart_paths)
    # The observed image of a VM under an OS-swap morph is read from the record's base: the swapped-in image
    # is what runs, so going back to the base always swaps the image.
    if _morphed(have, "image") and Reason.IMAGE not in reasons:
        reasons.append(Reason.IMAGE)
        restart.append("image")
    reasons.append(Reason.MORPHS_RESET)
    action = reset.action
    if action is Action.NOOP or (action is Action.UPDATE_LIVE and restart):
        action = Action.UPDATE_RESTART if restart else Action.UPDATE_LIVE
    return Change(reset.address, action, have, want, tuple(reasons), tuple(restart), reset.replace_paths)


def _compare(want: VmState, have: VmState, opts: Options, honour_morphs: bool) -> Change:
    """The change from `have` to `want`; with `honour_morphs`, differences at paths an active morph
    explains are not changes."""
    morphed = (lambda path: _morphed(have, path)) if honour_morphs else (lambda path: False)
    reasons: list[Reason] = []
    restart: list[str] = []
    replace_: list[str] = []
    if want.pool != have.pool and have.pool is not None:
        reasons.append(Reason.POOL)
        replace_.append("pool")
    if want.max_vcpus != have.max_vcpus:
        reasons.append(Reason.CPU_MAX)
        restart.append("cpu.bound")
    elif want.vcpus != have.vcpus and not morphed("cpu"):
        if want.vcpus < have.vcpus and have.running and not opts.cpu_unplug:
            reasons.append(Reason.CPU_UNPLUG)
            restart.append("cpu")
        else:
            reasons.append(Reason.CPU_LIVE)
    if want.max_memory_kib != have.max_memory_kib:
        reasons.append(Reason.MEMORY_MAX)
        restart.append("memory.bound")
    elif want.memory_kib != have.memory_kib and not morphed("memory"):
        reasons.append(Reason.MEMORY_LIVE)
    if want.image != have.image and not morphed("image"):
        reasons.append(Reason.IMAGE)
        restart.append("image")
    wd = {d.name: d for d in want.disks}
    hd = {d.name: d for d in have.disks}
    _added_removed("disk", wd, hd, morphed, opts, reasons, restart)
    for n in sorted(wd.keys() & hd.keys()):
        if hd[n].size_kib and wd[n].size_kib != hd[n].size_kib:
            reasons.append(Reason.DISK_RESIZE)
            restart.append(f"disk.{n}.size")
    wn = {n.name: n for n in want.nics}
    hn = {n.name: n for n in have.nics}
    _added_removed("nic", wn, hn, morphed, opts, reasons, restart)
    for n in sorted(wn.keys() & hn.keys()):
        a, b = wn[n], hn[n]
        if (a.network, a.bridge, a.model) != (b.network, b.bridge, b.model) and not morphed(f"nic.{n}"):
            reasons.append(Reason.NIC_CHANGE)
            if not opts.device_hotplug or a.model != b.model:
                restart.append(f"nic.{n}")
    if not opts.device_hotplug and any(r in reasons for r in (Reason.DISK_ADD, Reason.DISK_REMOVE,
                                                              Reason.NIC_ADD, Reason.NIC_REMOVE)):
        reasons.append(Reason.NO_HOTPLUG)
    if not have.running and not reasons:
        reasons.append(Reason.NOT_RUNNING)
    address = f"vm.{want.name}"
    if replace_:
        return Change(address, Action.REPLACE, have, want, tuple(reasons), tuple(restart), tuple(replace_))
    if restart:
        return Change(address, Action.UPDATE_RESTART, have, want, tuple(reasons), tuple(restart))
    if reasons:
        return Change(address, Action.UPDATE_LIVE, have, want, tuple(reasons))
    return Change(address, Action.NOOP, have, want, ())


_ADD = {"disk": Reason.DISK_ADD, "nic": Reason.NIC_ADD}
_REMOVE = {"disk": Reason.DISK_REMOVE, "nic": Reason.NIC_REMOVE}


def _added_removed(kind: str, want: dict, have_devices: dict, morphed, opts: Options,
                   reasons: list[Reason], restart: list[str]) -> None:
    """Devices of one kind that appear or disappear: live with hotplug, a restart without it. A device a
    morph attached or detached (`morphed(path)`) is left as it is."""
    for n in sorted(want.keys() - have_devices.keys()):
        if morphed(f"{kind}.{n}"):
            continue
        reasons.append(_ADD[kind])
        if not opts.device_hotplug:
            restart.append(f"{kind}.{n}")
    for n in sorted(have_devices.keys() - want.keys()):
        if morphed(f"{kind}.{n}"):
            continue
        reasons.append(_REMOVE[kind])
        if not opts.device_hotplug:
            restart.append(f"{kind}.{n}")


def _morphed(have: VmState, path: str) -> bool:
    """True when an active morph explains a difference at `path` (morphs are allowed deviations)."""
    return bool(have.owner) and any(m == path or m.startswith(path + ":") for m in have.owner.morphs)


def _drift(have: VmState) -> list[Drift]:
    """Actual against the base vmflow recorded when it last applied (morphs excepted)."""
    if have.owner is None or not have.owner.base:
        return []
    base = have.owner.base
    out = []
    for path, actual in (("cpu", have.vcpus), ("cpu.bound", have.max_vcpus), ("memory", have.memory_kib),
                         ("memory.bound", have.max_memory_kib)):
        applied = base.get(path)
        if applied is not None and applied != actual and not _morphed(have, path.split(".")[0]):
            out.append(Drift(f"vm.{have.name}", path, applied, actual))
    return out


def plan(desired: dict[str, VmState], actual: ActualState, opts: Options = Options()) -> Plan:
    changes: list[Change] = []
    problems: list[Problem] = []
    drift: list[Drift] = []
    for name in sorted(desired):
        want = desired[name]
        have = actual.vms.get(name)
        if have is None:
            clash = next((u for u in actual.unmanaged if u.name == name), None)
            if clash is not None and clash.program:
                problems.append(Problem(f"vm.{name}", f"a domain named `{name}` belongs to the vmflow program "
                                        f"`{clash.program}`; a program never changes another's VMs: rename the vm"))
                continue
            if clash is not None:
                problems.append(Problem(f"vm.{name}", f"a domain named `{name}` exists and is not managed by "
                                        "vmflow; it is never changed: rename the vm or remove the domain"))
                continue
            changes.append(Change(f"vm.{name}", Action.CREATE, None, want, (Reason.NOT_FOUND,)))
            continue
        drift.extend(_drift(have))
        changes.append(_diff_vm(want, have, opts))
    owned_gone = sorted(n for n, v in actual.vms.items() if n not in desired)
    held: tuple[str, ...] = ()
    held_because = "no-prune"
    if owned_gone:
        share = len(owned_gone) / max(len(actual.vms), 1)
        if not opts.prune:
            held = tuple(owned_gone)
        elif share > opts.mass_delete_share and not opts.allow_mass_delete:
            problems.append(Problem("program", f"the plan would delete {len(owned_gone)} of {len(actual.vms)} "
                                    f"owned VMs ({share:.0%}); pass --allow-mass-delete if that is intended"))
            held = tuple(owned_gone)
            held_because = "mass-delete"
        else:
            for name in owned_gone:
                changes.append(Change(f"vm.{name}", Action.DELETE, actual.vms[name], None,
                                      (Reason.REMOVED_FROM_PROGRAM,)))
    problems.extend(_capacity(desired, opts))
    changes.sort(key=lambda c: c.address)
    return Plan(tuple(changes), tuple(drift), tuple(problems), held, held_because)


def _capacity(desired: dict[str, VmState], opts: Options) -> list[Problem]:
    used: dict[str, list[int]] = {}
    for vm in desired.values():
        if vm.pool is None:
            continue
        u = used.setdefault(vm.pool, [0, 0])
        u[0] += vm.vcpus
        u[1] += vm.memory_kib
    out = []
    for pool, (cpu, mem) in sorted(used.items()):
        cap = opts.pools.get(pool)
        if not cap:
            continue
        ccpu, cmem = cap
        if ccpu is not None and cpu > ccpu:
            out.append(Problem(f"pool.{pool}", f"needs {cpu} vCPUs, has {ccpu}"))
        if cmem is not None and mem > cmem:
            out.append(Problem(f"pool.{pool}", f"needs {mem // 1024} MiB of memory, has {cmem // 1024} MiB"))
    return out
