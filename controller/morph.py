"""A morph as a change of desired state: `apply_morph` and `revert_morph` turn a VM's current state and one
of its morphs into the state to apply, and `base_changed` says when the repository has moved a VM's base
from under its morphs.

Pure functions of their arguments (no libvirt, no database, no clock), shared by the rule engine
(controller/rules.py), which decides when a morph fires, and the planner (controller/plan.py), which accepts
the differences active morphs explain and resets them when the base changes. specs/morphs.md states the
rules.

The record of active morphs is `Ownership.morphs`: one `"<path>:<morph>"` per path a morph has changed,
where the path is `cpu`, `memory`, `image`, `disk.<name>` or `nic.<name>` (a morph attaching two disks
leaves two entries). The record's `base` is never changed by a morph: it stays the base the repository last
applied, which is what tells a morph from a change of the program.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from compiler import model as M
from controller import domain_xml
from controller.state import DiskState, NicState, Ownership, VmState


@dataclass(frozen=True, slots=True)
class MorphResult:
    """What firing or reverting a morph gives: the state to apply and what it changes.

    `changed` is False when the morph would change nothing but its record: a fire at its bound (`cpu += 2 max
    8` at 8 vCPUs), a disk already attached, an image already swapped. The rule engine reports that as
    `skipped-bound` and applies nothing."""

    target: VmState
    records: tuple[str, ...]  # the record entries added (apply) or dropped (revert)
    changed: bool
    summary: str  # human: "cpu 4 → 6", "image linux-base → linux-base-large", "cpu at 8 (max 8)"


# ------------------------------------------------------------------------------------------ records


def record(path: str, morph: str) -> str:
    return f"{path}:{morph}"


def paths(morph: M.MorphSpec) -> tuple[str, ...]:
    """The paths a morph changes, in the order of its actions (each once)."""
    out: list[str] = []
    for a in morph.actions:
        if isinstance(a, M.AdjustAction):
            p = a.resource
        elif isinstance(a, M.AttachDiskAction):
            p = f"disk.{a.disk.name}"
        elif isinstance(a, M.DetachAction):
            p = f"{a.device}.{a.name}"
        elif isinstance(a, M.SwapImageAction):
            p = "image"
        else:
            p = f"nic.{a.nic.name}"
        if p not in out:
            out.append(p)
    return tuple(out)


def morph_of(entry: str) -> tuple[str, str]:
    """A record entry → (path, morph name)."""
    path, _, name = entry.rpartition(":")
    return path, name


def active(vm: VmState, morph: str) -> bool:
    """True when the VM's record says the morph is in effect."""
    return bool(vm.owner) and any(morph_of(e)[1] == morph for e in vm.owner.morphs)


def active_morphs(vm: VmState) -> tuple[str, ...]:
    """Names of the morphs in effect, in the order they were recorded (each once)."""
    out: list[str] = []
    for e in vm.owner.morphs if vm.owner else ():
        name = morph_of(e)[1]
        if name not in out:
            out.append(name)
    return tuple(out)


def cumulative(morph: M.MorphSpec) -> bool:
    """A morph that can usefully fire again while it is in effect: `cpu += 2` grows again, up to its bound.
    Setting a size, swapping an image and reconfiguring devices reach their end state in one firing."""
    return all(isinstance(a, M.AdjustAction) and a.op != "set" for a in morph.actions)


def _owner(vm: VmState) -> Ownership:
    return vm.owner or Ownership("", f"vm.{vm.name}", None)


def _with_records(vm: VmState, morphs: tuple[str, ...]) -> VmState:
    return replace(vm, owner=replace(_owner(vm), morphs=morphs))


# ------------------------------------------------------------------------------------------ sizes


def _unit(resource: str) -> int:
    """The morph amounts are vCPUs and bytes; VmState holds vCPUs and KiB."""
    return 1 if resource == "cpu" else 1024


def _current(vm: VmState, resource: str) -> int:
    return vm.vcpus if resource == "cpu" else vm.memory_kib


def _ceiling(vm: VmState, spec: M.VmSpec, resource: str) -> int:
    """The most a morph may give: the VM's bound, and the hypervisor maximum it was defined with."""
    if resource == "cpu":
        return min(spec.cpu.bound, vm.max_vcpus)
    return min(spec.memory.bound // 1024, vm.max_memory_kib)


def _base(spec: M.VmSpec, resource: str) -> int:
    return spec.cpu.base if resource == "cpu" else spec.memory.base // 1024


def _with_size(vm: VmState, resource: str, value: int) -> VmState:
    return replace(vm, vcpus=value) if resource == "cpu" else replace(vm, memory_kib=value)


def _fmt(resource: str, value: int) -> str:
    if resource == "cpu":
        return str(value)
    for unit, kib in (("TiB", 1024**3), ("GiB", 1024**2), ("MiB", 1024)):
        if value >= kib and value % kib == 0:
            return f"{value // kib}{unit}"
        if value >= kib:
            return f"{value / kib:.1f}{unit}"
    return f"{value}KiB"


def _adjusted(vm: VmState, spec: M.VmSpec, a: M.AdjustAction) -> int:
    """The size after the action, clamped to what the VM allows; never further from where it is than the
    action asks (a `+=` never shrinks a VM that another morph grew past this one's `max`)."""
    cur = _current(vm, a.resource)
    unit = _unit(a.resource)
    ceiling = _ceiling(vm, spec, a.resource)
    if a.op == "add":
        top = min(ceiling, a.limit // unit) if a.limit is not None else ceiling
        return max(cur, min(cur + a.amount // unit, top))
    if a.op == "sub":
        floor = max(a.limit // unit, 1) if a.limit is not None else 1
        return min(cur, max(cur - a.amount // unit, floor))
    return max(1, min(a.amount // unit, ceiling))


# ------------------------------------------------------------------------------------------ apply


def apply_morph(vm: VmState, spec: M.VmSpec, morph: M.MorphSpec) -> MorphResult:
    """The state after firing `morph` on `vm` (its current state), within `spec`'s bounds, with the morph's
    record entries added. Identity stays: name, UUID, MACs and the disks the morph does not touch."""
    state = vm
    notes: list[str] = []
    for a in morph.actions:
        state = _apply_action(state, spec, a, notes)
    changed = _shape(state) != _shape(vm)
    new = tuple(record(p, morph.name) for p in paths(morph))
    if not changed:
        return MorphResult(vm, (), False, _at_bound(vm, spec, morph))
    have = _owner(vm).morphs
    merged = have + tuple(e for e in new if e not in have)
    return MorphResult(_with_records(state, merged), new, True, "; ".join(notes))


def _apply_action(vm: VmState, spec: M.VmSpec, a: M.Action, notes: list[str]) -> VmState:
    if isinstance(a, M.AdjustAction):
        cur = _current(vm, a.resource)
        value = _adjusted(vm, spec, a)
        if value != cur:
            notes.append(f"{a.resource} {_fmt(a.resource, cur)} → {_fmt(a.resource, value)}")
        return _with_size(vm, a.resource, value)
    if isinstance(a, M.AttachDiskAction):
        if any(d.name == a.disk.name for d in vm.disks):
            return vm
        notes.append(f"attach disk {a.disk.name}")
        return replace(vm, disks=vm.disks + (DiskState(a.disk.name, a.disk.size // 1024, a.disk.source),))
    if isinstance(a, M.DetachAction) and a.device == "disk":
        if not any(d.name == a.name for d in vm.disks):
            return vm
        notes.append(f"detach disk {a.name}")
        return replace(vm, disks=tuple(d for d in vm.disks if d.name != a.name))
    if isinstance(a, M.DetachAction):
        if not any(n.name == a.name for n in vm.nics):
            return vm
        notes.append(f"detach nic {a.name}")
        return replace(vm, nics=tuple(n for n in vm.nics if n.name != a.name))
    if isinstance(a, M.SwapImageAction):
        if vm.image == a.image:
            return vm
        notes.append(f"image {vm.image} → {a.image}")
        return replace(vm, image=a.image)
    return _set_nic(vm, a.nic, notes)


def _set_nic(vm: VmState, nic: M.NicSpec, notes: list[str]) -> VmState:
    """Give the NIC of that name these settings (its MAC stays unless one is given), or add it."""
    for i, n in enumerate(vm.nics):
        if n.name == nic.name:
            new = replace(n, network=nic.network, bridge=nic.bridge, model=nic.model, mac=nic.mac or n.mac)
            if new == n:
                return vm
            notes.append(f"nic {nic.name} → {_nic_where(new)}")
            return replace(vm, nics=vm.nics[:i] + (new,) + vm.nics[i + 1:])
    notes.append(f"add nic {nic.name} on {_nic_where(nic)}")
    return replace(vm, nics=vm.nics + (NicState(nic.name, nic.network, nic.bridge, nic.model, nic.mac),))


def _nic_where(n) -> str:
    return f"network {n.network}" if n.network is not None else f"bridge {n.bridge}"


def _shape(vm: VmState) -> tuple:
    """What a morph can change (the record aside)."""
    return (vm.image, vm.vcpus, vm.memory_kib, vm.disks, vm.nics)


def _at_bound(vm: VmState, spec: M.VmSpec, morph: M.MorphSpec) -> str:
    for a in morph.actions:
        if isinstance(a, M.AdjustAction):
            cur = _current(vm, a.resource)
            if a.op == "set":
                return f"{a.resource} is already {_fmt(a.resource, cur)}"
            if a.op == "add":
                top = _ceiling(vm, spec, a.resource)
                if a.limit is not None:
                    top = min(top, a.limit // _unit(a.resource))
                return f"{a.resource} at {_fmt(a.resource, cur)} (max {_fmt(a.resource, top)})"
            floor = max(a.limit // _unit(a.resource), 1) if a.limit is not None else 1
            return f"{a.resource} at {_fmt(a.resource, cur)} (min {_fmt(a.resource, floor)})"
    return f"already in effect: {', '.join(paths(morph))}"


# ------------------------------------------------------------------------------------------ revert


def revert_morph(vm: VmState, spec: M.VmSpec, morph: M.MorphSpec) -> MorphResult:
    """The state after undoing `morph` on `vm`, back towards the base and never past it, with the morph's
    record entries dropped. A path no other active morph explains goes back to its base exactly, so the
    planner finds nothing left to correct."""
    mine = {record(p, morph.name) for p in paths(morph)}
    have = _owner(vm).morphs
    dropped = tuple(e for e in have if e in mine)
    left = tuple(e for e in have if e not in mine)
    others: dict[str, list[str]] = {}  # path -> the other morphs in effect there, oldest first
    for e in left:
        p, name = morph_of(e)
        others.setdefault(p, []).append(name)
    state = _with_records(vm, left)
    notes: list[str] = []
    for a in morph.actions:
        state = _revert_action(state, spec, a, others, notes)
    return MorphResult(state, dropped, _shape(state) != _shape(vm), "; ".join(notes) or "nothing to undo")


def _revert_action(vm: VmState, spec: M.VmSpec, a: M.Action, others: dict[str, list[str]],
                   notes: list[str]) -> VmState:
    if isinstance(a, M.AdjustAction):
        r = a.resource
        cur, base, unit = _current(vm, r), _base(spec, r), _unit(r)
        if r not in others:
            value = base
        elif a.op == "add":
            value = min(cur, max(base, cur - a.amount // unit))
        elif a.op == "sub":
            value = max(cur, min(base, cur + a.amount // unit))
        else:
            value = cur  # what `=` replaced is not known; the other morphs still explain the size
        if value != cur:
            notes.append(f"{r} {_fmt(r, cur)} → {_fmt(r, value)}")
        return _with_size(vm, r, value)
    if isinstance(a, M.AttachDiskAction):
        if f"disk.{a.disk.name}" in others or not any(d.name == a.disk.name for d in vm.disks):
            return vm
        notes.append(f"detach disk {a.disk.name}")
        return replace(vm, disks=tuple(d for d in vm.disks if d.name != a.disk.name))
    if isinstance(a, M.DetachAction) and a.device == "disk":
        declared = next((d for d in spec.disks if d.name == a.name), None)
        if declared is None or f"disk.{a.name}" in others or any(d.name == a.name for d in vm.disks):
            return vm
        notes.append(f"attach disk {a.name}")
        return replace(vm, disks=vm.disks + (DiskState(declared.name, declared.size // 1024, declared.source),))
    if isinstance(a, M.SwapImageAction):
        # Back to the base image, or to the image of the latest image morph still in effect.
        still = [i for i in (_swap_of(spec, m) for m in others.get("image", ())) if i is not None]
        image = still[-1] if still else spec.image
        if vm.image == image:
            return vm
        notes.append(f"image {vm.image} → {image}")
        return replace(vm, image=image)
    name = a.name if isinstance(a, M.DetachAction) else a.nic.name
    if f"nic.{name}" in others:
        return vm
    declared = next((n for n in spec.nics if n.name == name), None)
    current = next((n for n in vm.nics if n.name == name), None)
    if declared is None:
        if current is None:
            return vm
        notes.append(f"detach nic {name}")
        return replace(vm, nics=tuple(n for n in vm.nics if n.name != name))
    if current is None:
        notes.append(f"attach nic {name}")
        return replace(vm, nics=vm.nics + (NicState(name, declared.network, declared.bridge, declared.model,
                                                     declared.mac),))
    new = replace(current, network=declared.network, bridge=declared.bridge, model=declared.model,
                  mac=declared.mac or current.mac)
    if new == current:
        return vm
    notes.append(f"nic {name} → {_nic_where(new)}")
    return replace(vm, nics=tuple(new if n.name == name else n for n in vm.nics))


def _swap_of(spec: M.VmSpec, morph: str) -> str | None:
    m = next((m for m in spec.morphs if m.name == morph), None)
    if m is None:
        return None
    return next((a.image for a in m.actions if isinstance(a, M.SwapImageAction)), None)


# ------------------------------------------------------------------------------------------ base changes


def base_of(vm: VmState) -> dict:
    """The base record a repository apply of `vm` writes (the same keys as the ownership record's `base`)."""
    return domain_xml.applied_owner(replace(vm, owner=None)).base


def base_changed(want: VmState, have: VmState) -> list[str]:
    """The keys of the recorded base (`owner.base`, as the repository last applied it) that the desired
    state no longer matches: `cpu`, `cpu.bound`, `memory`, `memory.bound`, `image`, `pool`, `disk_sizes`.
    Only recorded keys are compared, so an empty record never reports a change."""
    if have.owner is None or not have.owner.base:
        return []
    want_base = base_of(want)
    return sorted(k for k, v in have.owner.base.items() if k in want_base and want_base[k] != v)


def reset_on_base_change(want: VmState, have: VmState) -> bool:
    """True when `have` has active morphs and the repository has changed its base since the last apply: the
    morphs are dropped and the VM goes to the new base (the planner's `morphs-reset`)."""
    return bool(have.owner and have.owner.morphs) and bool(base_changed(want, have))
