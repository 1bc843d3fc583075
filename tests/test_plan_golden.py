"""Golden plans: `plan(desired, actual, options)` on small hand-written pairs, and snapshots of how each plan
renders as text and as JSON.

Layout, under tests/golden/plans/:

    <case>.yaml        the case: `desired`, `actual` and `unmanaged` lists and `options`
    <case>.txt         `render_plan.render_text(plan, colour=False, unmanaged=...)`, as `vmflow plan` prints it
    <case>.json        `render_plan.to_json(plan)`, indented, keys sorted

A case file opens with a comment saying what it shows. Its keys:

    desired, actual    lists of VM states: the fields of `controller.state.VmState`. `name`, `vcpus` and
                       `memory_kib` are required; `image` defaults to linux-base, `max_vcpus` and
                       `max_memory_kib` to the current values, `running` to true. Sizes (`*_kib`) are KiB as
                       integers, or quantities with a unit (`4GiB`). `disks` and `nics` are lists of the fields
                       of `DiskState` and `NicState`. `owner` (the fields of `Ownership`) defaults to this
                       program owning the VM; give `morphs` (`cpu:grow`) and a `base` (as applied: `cpu`,
                       `cpu.bound`, `memory`, `memory.bound`) to show morphs and drift.
    unmanaged          domains vmflow does not own: `name`, and optionally `uuid` and `running`
    options            `prune`, `allow_mass_delete`, `mass_delete_share`, `device_hotplug`, `cpu_unplug` (both default true) and
                       `pools`: `{rack1: {cpu: 32, memory: 128GiB}}` (either may be left out: unlimited)

Unknown keys are errors, so a misspelt field cannot quietly fall back to its default. Every `Action` and every
`Reason` must appear in at least one case. `VMFLOW_BLESS=1` rewrites the snapshots instead of comparing them
(and removes those of deleted cases); read the diff as you would read code.
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from compiler.units import Dimension, parse_quantity
from controller import render_plan
from controller.plan import Action, Options, Plan, Reason, plan
from controller.state import ActualState, DiskState, NicState, Ownership, Unmanaged, VmState
from test_golden import BLESS, check_snapshot, rel

PLANS = Path(__file__).resolve().parent / "golden" / "plans"
PROGRAM = "golden"
SNAPSHOTS = (".txt", ".json")


# ------------------------------------------------------------------------------------------ loading


class CaseError(ValueError):
    pass


def _kib(value: object, where: str) -> int | None:
    """KiB from an integer (already KiB) or a quantity with a byte unit (`4GiB`)."""
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        q = parse_quantity(value)
        if q is not None and q[0] is Dimension.BYTES and q[1] % 1024 == 0:
            return int(q[1]) // 1024
    raise CaseError(f"{where}: `{value}` is neither KiB nor a size such as `4GiB`")


def _checked(d: object, cls, where: str, required: tuple[str, ...] = ()) -> dict:
    if not isinstance(d, dict):
        raise CaseError(f"{where}: expected a mapping, got `{d!r}`")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise CaseError(f"{where}: unknown field{'s' if len(unknown) > 1 else ''} {unknown}; "
                        f"{cls.__name__} has {sorted(known)}")
    missing = [k for k in required if k not in d]
    if missing:
        raise CaseError(f"{where}: missing {missing}")
    return dict(d)


def _vm(d: object, where: str) -> VmState:
    d = _checked(d, VmState, where, ("name", "vcpus", "memory_kib"))
    where = f"{where} ({d['name']})"
    d.setdefault("image", "linux-base")
    d.setdefault("max_vcpus", d["vcpus"])
    for key in ("memory_kib", "max_memory_kib"):
        if key in d:
            d[key] = _kib(d[key], f"{where}.{key}")
    d.setdefault("max_memory_kib", d["memory_kib"])
    disks = []
    for i, x in enumerate(d.get("disks") or ()):
        x = _checked(x, DiskState, f"{where}.disks[{i}]", ("name",))
        x["size_kib"] = _kib(x.get("size_kib", 0), f"{where}.disks[{i}].size_kib")
        x.setdefault("source", None)
        disks.append(DiskState(**x))
    d["disks"] = tuple(disks)
    nics = []
    for i, x in enumerate(d.get("nics") or ()):
        x = _checked(x, NicState, f"{where}.nics[{i}]", ("name",))
        x.setdefault("network", None)
        x.setdefault("bridge", None)
        x.setdefault("model", "virtio")
        nics.append(NicState(**x))
    d["nics"] = tuple(nics)
    o = _checked(d.get("owner") or {}, Ownership, f"{where}.owner")
    o.setdefault("program", PROGRAM)
    o.setdefault("address", f"vm.{d['name']}")
    o.setdefault("revision", None)
    base = dict(o.get("base") or {})
    for key in ("memory", "memory.bound"):
        if key in base:
            base[key] = _kib(base[key], f"{where}.owner.base.{key}")
    o["base"] = base
    o["morphs"] = tuple(o.get("morphs") or ())
    o["nics"] = tuple(o.get("nics") or (n.name for n in nics))
    d["owner"] = Ownership(**o)
    d["snapshots"] = tuple(d.get("snapshots") or ())
    return VmState(**d)


def _options(d: object, where: str) -> Options:
    d = _checked(d or {}, Options, where)
    pools = {}
    for name, cap in (d.get("pools") or {}).items():
        cap = cap or {}
        unknown = sorted(set(cap) - {"cpu", "memory"})
        if unknown:
            raise CaseError(f"{where}.pools.{name}: unknown {unknown}; a pool has `cpu` and `memory`")
        pools[name] = (cap.get("cpu"), _kib(cap.get("memory"), f"{where}.pools.{name}.memory"))
    d["pools"] = pools
    return Options(**d)


def load_case(path: Path) -> tuple[dict[str, VmState], ActualState, Options]:
    """A case file → the planner's three inputs."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    where = rel(path)
    unknown = sorted(set(doc) - {"desired", "actual", "unmanaged", "options"})
    if unknown:
        raise CaseError(f"{where}: unknown keys {unknown}; a case has desired, actual, unmanaged and options")
    desired: dict[str, VmState] = {}
    for i, x in enumerate(doc.get("desired") or ()):
        vm = _vm(x, f"{where}: desired[{i}]")
        if vm.name in desired:
            raise CaseError(f"{where}: desired `{vm.name}` twice")
        desired[vm.name] = vm
    vms: dict[str, VmState] = {}
    for i, x in enumerate(doc.get("actual") or ()):
        vm = _vm(x, f"{where}: actual[{i}]")
        if vm.name in vms:
            raise CaseError(f"{where}: actual `{vm.name}` twice")
        vms[vm.name] = vm
    unmanaged = []
    for i, x in enumerate(doc.get("unmanaged") or ()):
        x = _checked(x, Unmanaged, f"{where}: unmanaged[{i}]", ("name",))
        if x["name"] in vms:
            raise CaseError(f"{where}: `{x['name']}` is both owned and unmanaged; libvirt names are unique")
        unmanaged.append(Unmanaged(x["name"], x.get("uuid", f"00000000-0000-4000-8000-{i:012d}"),
                                   x.get("running", True)))
    actual = ActualState(vms, tuple(sorted(unmanaged, key=lambda u: u.name)), "test:///golden")
    return desired, actual, _options(doc.get("options"), f"{where}: options")


def cases() -> list[Path]:
    return sorted(PLANS.glob("*.yaml"))


@lru_cache(maxsize=None)
def planned(path: Path) -> tuple[Plan, ActualState]:
    desired, actual, options = load_case(path)
    return plan(desired, actual, options), actual


def render_both(path: Path) -> dict[str, str]:
    """A case's plan in the two renderings its snapshots hold, keyed by snapshot suffix."""
    p, actual = planned(path)
    return {
        ".txt": render_plan.render_text(p, colour=False, unmanaged=len(actual.unmanaged)),
        ".json": json.dumps(render_plan.to_json(p), indent=2, sort_keys=True, default=str) + "\n",
    }


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("path", cases(), ids=lambda p: p.stem)
def test_plan_snapshots(path: Path) -> None:
    for suffix, text in render_both(path).items():
        check_snapshot(path.with_suffix(suffix), text)


def test_no_orphan_snapshots() -> None:
    """Every snapshot belongs to a case; a renamed case leaves none behind (bless removes them)."""
    stems = {p.stem for p in cases()}
    orphans = sorted(p for s in SNAPSHOTS for p in PLANS.glob(f"*{s}") if p.stem not in stems)
    if BLESS:
        for p in orphans:
            p.unlink()
        return
    assert not orphans, f"snapshots without a case: {[rel(p) for p in orphans]}"


def _covered() -> tuple[set[Action], set[Reason]]:
    actions, reasons = set(), set()
    for path in cases():
        for c in planned(path)[0].changes:
            actions.add(c.action)
            reasons.update(c.reasons)
    return actions, reasons


@pytest.mark.parametrize("action", list(Action), ids=lambda a: a.value)
def test_every_action_has_a_case(action: Action) -> None:
    assert action in _covered()[0], f"no case under {rel(PLANS)} plans a `{action.value}`"


@pytest.mark.parametrize("reason", list(Reason), ids=lambda r: r.value)
def test_every_reason_has_a_case(reason: Reason) -> None:
    assert reason in _covered()[1], f"no case under {rel(PLANS)} gives the reason `{reason.value}`"


def test_a_misspelt_field_is_an_error(tmp_path: Path) -> None:
    case = tmp_path / "typo.yaml"
    case.write_text("desired:\n  - {name: web, vcpus: 2, memory_kib: 1GiB, max_vcpu: 4}\n")
    with pytest.raises(CaseError, match=r"unknown field \['max_vcpu'\]"):
        load_case(case)
