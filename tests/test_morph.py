"""Morphs as changes of desired state (controller/morph.py), and how the planner treats morphed VMs.

Every morph kind fired and reverted on a VM compiled from `.flow`: the target stays within the VM's bounds,
keeps its identity, and records the morph; reverting goes back to the base and drops the record. The
planner accepts a morphed VM whose base is unchanged (a no-op, `morphed`), and when the program changes
the base it plans the VM back to the new base with its morphs dropped (`morphs-reset`).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler import model as M
from compiler.ast import Span
from compiler.program import Compiler
from compiler.units import Dimension
from controller import domain_xml
from controller.morph import (
    MorphResult,
    active,
    active_morphs,
    apply_morph,
    base_changed,
    base_of,
    cumulative,
    paths,
    reset_on_base_change,
    revert_morph,
)
from controller.plan import Action, Reason, plan
from controller.state import ActualState, DiskState, NicState, VmState, desired_state

GIB_KIB = 1024 * 1024
PROGRAM = "prog"

FLOW = """
vm web {
  image  = linux-base
  cpu    = 2 .. 8
  memory = 4GiB .. 16GiB
  disk data { size = 20GiB }
  nic lan { network = "default" }
  nic wan { network = "public" }

  morph grow when cpu > 80% for 5m {
    cpu += 2 max 6
    cooldown 10m
    revert when cpu < 30% for 30m
  }
  morph shrink when cpu < 5% for 1h {
    cpu -= 1 min 1
    cooldown 1h
  }
  morph pin when cpu > 99% {
    cpu = 8
    cooldown 1h
  }
  morph more when memory > 90% for 2m {
    memory += 8GiB
    cooldown 10m
  }
  morph scratch when disk.read > 50MB/s for 10m {
    attach disk scratch { size = 100GiB }
    detach disk data
    cooldown 1h
  }
  morph bigger when memory > 95% for 2m {
    swap image linux-base-large
    cooldown 1h
  }
  morph isolate when net.rx > 100MB/s for 5m {
    nic lan { network = "quarantine" }
    nic backup { bridge = "br0" }
    detach nic wan
    cooldown 30m
  }
}
"""

# One morph of each kind, by the record paths it leaves.
KINDS = {
    M.MorphKind.CPU: ("grow", ("cpu:grow",)),
    M.MorphKind.MEMORY: ("more", ("memory:more",)),
    M.MorphKind.DISK: ("scratch", ("disk.scratch:scratch", "disk.data:scratch")),
    M.MorphKind.IMAGE: ("bigger", ("image:bigger",)),
    M.MorphKind.NETWORK: ("isolate", ("nic.lan:isolate", "nic.backup:isolate", "nic.wan:isolate")),
}


def compile_vm(text: str = FLOW, name: str = "web") -> M.VmSpec:
    comp = Compiler().compile_files({"web.flow": text.encode()}, Path("."), Path("."))
    errors = [d for d in comp.diagnostics if d.severity.value == "error"]
    assert not errors, errors
    return comp.program.vms[name]


SPEC = compile_vm()


def morph_named(name: str, spec: M.VmSpec = SPEC) -> M.MorphSpec:
    return next(m for m in spec.morphs if m.name == name)


def applied(spec: M.VmSpec = SPEC) -> VmState:
    """The VM as vmflow applied it: the desired state, with a UUID and MACs, and the base recorded."""
    vm = desired_state(spec, PROGRAM)
    nics = tuple(replace(n, mac=f"52:54:00:00:00:{i:02x}") for i, n in enumerate(vm.nics))
    vm = replace(vm, uuid="5f1c6c0e-0000-4000-8000-000000000001", nics=nics)
    return replace(vm, owner=domain_xml.applied_owner(vm))


def shape(vm: VmState) -> tuple:
    return vm.image, vm.vcpus, vm.memory_kib, vm.disks, vm.nics


# ------------------------------------------------------------------------------------------ every kind


@pytest.mark.parametrize("kind", list(M.MorphKind), ids=lambda k: k.value)
def test_every_kind_applies_and_reverts_to_the_base(kind: M.MorphKind) -> None:
    name, records = KINDS[kind]
    m = morph_named(name)
    assert m.kind is kind
    vm = applied()
    fired = apply_morph(vm, SPEC, m)
    assert isinstance(fired, MorphResult) and fired.changed
    assert set(fired.records) == set(records) and set(fired.target.owner.morphs) == set(records)
    assert set(paths(m)) == {r.split(":")[0] for r in records}
    assert active(fired.target, name) and active_morphs(fired.target) == (name,)
    assert shape(fired.target) != shape(vm)
    # Identity stays: name, UUID, the base record, and the MACs of the NICs that stay.
    t = fired.target
    assert (t.name, t.uuid, t.max_vcpus, t.max_memory_kib) == (vm.name, vm.uuid, vm.max_vcpus, vm.max_memory_kib)
    assert t.owner.base == vm.owner.base
    macs = {n.name: n.mac for n in vm.nics}
    assert all(n.mac == macs[n.name] for n in t.nics if n.name in macs)

    back = revert_morph(t, SPEC, m)
    assert back.changed and set(back.records) == set(records)
    assert back.target.owner.morphs == () and not active(back.target, name)
    assert back.target.image == vm.image and back.target.vcpus == vm.vcpus
    assert back.target.memory_kib == vm.memory_kib
    assert {d.name: d.size_kib for d in back.target.disks} == {d.name: d.size_kib for d in vm.disks}
    assert {n.name: (n.network, n.bridge, n.model) for n in back.target.nics} == \
           {n.name: (n.network, n.bridge, n.model) for n in vm.nics}
    # A NIC that stayed keeps its MAC; one detached and attached again gets its declared MAC, if any.
    assert {n.name: n.mac for n in back.target.nics if n.mac} == \
           {n.name: n.mac for n in vm.nics if n.name in {x.name for x in t.nics}}


def test_the_effect_of_each_kind() -> None:
    vm = applied()
    assert apply_morph(vm, SPEC, morph_named("grow")).target.vcpus == 4
    assert apply_morph(vm, SPEC, morph_named("shrink")).target.vcpus == 1
    assert apply_morph(vm, SPEC, morph_named("pin")).target.vcpus == 8
    assert apply_morph(vm, SPEC, morph_named("more")).target.memory_kib == 12 * GIB_KIB
    disks = apply_morph(vm, SPEC, morph_named("scratch")).target.disks
    assert disks == (DiskState("scratch", 100 * GIB_KIB, None),)
    swapped = apply_morph(vm, SPEC, morph_named("bigger")).target
    assert swapped.image == "linux-base-large" and swapped.disks == vm.disks and swapped.nics == vm.nics
    nics = {n.name: n for n in apply_morph(vm, SPEC, morph_named("isolate")).target.nics}
    assert set(nics) == {"lan", "backup"}
    assert nics["lan"].network == "quarantine" and nics["lan"].mac == "52:54:00:00:00:00"
    assert nics["backup"] == NicState("backup", None, "br0", "virtio", None)


def test_summaries_say_what_changes() -> None:
    vm = applied()
    assert apply_morph(vm, SPEC, morph_named("grow")).summary == "cpu 2 → 4"
    assert apply_morph(vm, SPEC, morph_named("more")).summary == "memory 4GiB → 12GiB"
    assert apply_morph(vm, SPEC, morph_named("bigger")).summary == "image linux-base → linux-base-large"


# ------------------------------------------------------------------------------------------ bounds


def test_cpu_add_clamps_at_its_max_then_reports_the_bound() -> None:
    m = morph_named("grow")  # cpu += 2 max 6, VM bound 8
    vm = applied()
    seen = []
    for _ in range(4):
        r = apply_morph(vm, SPEC, m)
        seen.append((r.target.vcpus, r.changed))
        vm = r.target
    assert seen == [(4, True), (6, True), (6, False), (6, False)]
    at = apply_morph(vm, SPEC, m)
    assert at.target is vm and at.records == () and at.summary == "cpu at 6 (max 6)"


def test_a_morph_never_goes_beyond_the_vm_bound() -> None:
    spec = compile_vm(FLOW.replace("cpu += 2 max 6", "cpu += 5"))
    r = apply_morph(applied(spec), spec, morph_named("grow", spec))
    assert r.target.vcpus == 7
    r = apply_morph(r.target, spec, morph_named("grow", spec))
    assert r.target.vcpus == 8  # the bound, not 12
    assert not apply_morph(r.target, spec, morph_named("grow", spec)).changed
    # memory += 8GiB from 12GiB stops at the 16GiB bound
    vm = applied()
    for want in (12, 16, 16):
        vm = apply_morph(vm, SPEC, morph_named("more")).target
        assert vm.memory_kib == want * GIB_KIB


def test_shrinking_stops_at_its_min() -> None:
    vm = applied()
    r = apply_morph(vm, SPEC, morph_named("shrink"))
    assert r.target.vcpus == 1
    again = apply_morph(r.target, SPEC, morph_named("shrink"))
    assert not again.changed and again.summary == "cpu at 1 (min 1)"


def test_a_grow_never_shrinks_a_vm_another_morph_grew_further() -> None:
    pinned = apply_morph(applied(), SPEC, morph_named("pin")).target  # cpu = 8
    r = apply_morph(pinned, SPEC, morph_named("grow"))  # += 2 max 6
    assert not r.changed and r.target.vcpus == 8


def test_a_set_already_in_effect_is_at_its_bound() -> None:
    pinned = apply_morph(applied(), SPEC, morph_named("pin")).target
    r = apply_morph(pinned, SPEC, morph_named("pin"))
    assert not r.changed and r.summary == "cpu is already 8"


def test_devices_and_images_do_not_fire_twice() -> None:
    for name in ("scratch", "bigger", "isolate"):
        once = apply_morph(applied(), SPEC, morph_named(name)).target
        twice = apply_morph(once, SPEC, morph_named(name))
        assert not twice.changed and twice.target == once, name
        assert not cumulative(morph_named(name))
    assert cumulative(morph_named("grow")) and not cumulative(morph_named("pin"))


def vm_spec(base: int, bound: int, morph: M.MorphSpec) -> M.VmSpec:
    """A VM with one morph, built as the resolver would (cheaper than compiling, and free of the compiler's
    own bound checks, so the morph's clamping is what is tested)."""
    return M.VmSpec("v", "linux-base", SPAN, None, None, M.Resource(base, bound, SPAN),
                    M.Resource(GIB_KIB * 1024, GIB_KIB * 1024, SPAN), (), (), None, (morph,), SPAN)


SPAN = Span("v.flow", 0, 0)
ALWAYS = M.Cmp(M.Metric("cpu", SPAN), ">", M.Const(80, Dimension.PERCENT, SPAN), None, SPAN)


@settings(max_examples=150, deadline=None)
@given(base=st.integers(1, 8), extra=st.integers(0, 8), amount=st.integers(1, 6),
       limit=st.none() | st.integers(1, 16), times=st.integers(1, 6))
def test_cpu_growth_stays_within_bounds_and_reverts_to_the_base(base, extra, amount, limit, times) -> None:
    bound = base + extra
    m = M.MorphSpec("v", "g", M.MorphKind.CPU, ALWAYS, (M.AdjustAction("cpu", "add", amount, limit, SPAN),),
                    60.0, None, SPAN)
    spec = vm_spec(base, bound, m)
    vm = applied(spec)
    for _ in range(times):
        r = apply_morph(vm, spec, m)
        assert r.target.vcpus <= bound and (limit is None or r.target.vcpus <= max(limit, base))
        assert r.target.vcpus >= vm.vcpus
        assert r.changed == (r.target.vcpus != vm.vcpus)
        vm = r.target
    back = revert_morph(vm, spec, m).target
    assert back.vcpus == base and back.owner.morphs == ()


# ------------------------------------------------------------------------------------------ reverting


def test_reverting_one_of_two_cpu_morphs_keeps_the_other() -> None:
    vm = apply_morph(applied(), SPEC, morph_named("grow")).target  # 4
    vm = apply_morph(vm, SPEC, morph_named("grow")).target  # 6
    spec = compile_vm(FLOW.replace("cpu = 8\n", "cpu = 7\n"))
    vm = apply_morph(vm, spec, morph_named("pin", spec)).target  # = 7
    assert vm.vcpus == 7 and set(vm.owner.morphs) == {"cpu:grow", "cpu:pin"}
    r = revert_morph(vm, spec, morph_named("grow", spec))
    # Back by the amount it adds, never below the base, while `pin` still explains the size.
    assert r.target.vcpus == 5 and r.target.owner.morphs == ("cpu:pin",)
    last = revert_morph(r.target, spec, morph_named("pin", spec))
    assert last.target.vcpus == 2 and last.target.owner.morphs == ()


def test_reverting_a_morph_not_in_effect_changes_nothing() -> None:
    vm = applied()
    r = revert_morph(vm, SPEC, morph_named("bigger"))
    assert not r.changed and r.records == () and r.target == vm and r.summary == "nothing to undo"


def test_reverting_one_of_two_image_morphs_goes_to_the_other_image() -> None:
    spec = compile_vm(FLOW.replace("  morph isolate", "  morph tiny when cpu < 1% { swap image linux-minimal"
                                   " cooldown 1h }\n  morph isolate"))
    vm = apply_morph(applied(spec), spec, morph_named("bigger", spec)).target
    vm = apply_morph(vm, spec, morph_named("tiny", spec)).target
    assert vm.image == "linux-minimal"
    back = revert_morph(vm, spec, morph_named("tiny", spec)).target
    assert back.image == "linux-base-large" and back.owner.morphs == ("image:bigger",)


# ------------------------------------------------------------------------------------------ the record


def test_the_record_survives_the_domain_xml() -> None:
    vm = applied()
    for name in ("grow", "scratch", "isolate"):
        vm = apply_morph(vm, SPEC, morph_named(name)).target
    xml = ET.tostring(domain_xml.ownership_xml(vm.owner), encoding="unicode")
    root = ET.fromstring(f"<domain><name>web</name><metadata>{xml}</metadata></domain>")
    owner = domain_xml._ownership(root)
    assert owner.morphs == vm.owner.morphs
    assert owner.morphs == ("cpu:grow", "disk.scratch:scratch", "disk.data:scratch", "nic.lan:isolate",
                            "nic.backup:isolate", "nic.wan:isolate")


# ------------------------------------------------------------------------------------------ the planner


def plan_one(want: VmState, have: VmState):
    p = plan({want.name: want}, ActualState({have.name: have}, (), "test:///morph"))
    (change,) = p.changes
    return p, change


@pytest.mark.parametrize("kind", list(M.MorphKind), ids=lambda k: k.value)
def test_a_morphed_vm_with_its_base_unchanged_is_a_morphed_no_op(kind: M.MorphKind) -> None:
    name, _ = KINDS[kind]
    morphed = apply_morph(applied(), SPEC, morph_named(name)).target
    p, change = plan_one(desired_state(SPEC, PROGRAM), morphed)
    assert change.action is Action.NOOP and change.reasons == (Reason.MORPHED,)
    assert not p.drift


def test_every_morph_at_once_is_still_a_no_op() -> None:
    vm = applied()
    for m in SPEC.morphs:
        vm = apply_morph(vm, SPEC, m).target
    _, change = plan_one(desired_state(SPEC, PROGRAM), vm)
    assert change.action is Action.NOOP and change.reasons == (Reason.MORPHED,)


def test_after_a_revert_there_is_nothing_to_plan() -> None:
    for m in SPEC.morphs:
        vm = apply_morph(applied(), SPEC, m).target
        back = revert_morph(vm, SPEC, m).target
        _, change = plan_one(desired_state(SPEC, PROGRAM), back)
        assert change.action is Action.NOOP and change.reasons == (), m.name


def test_a_base_change_resets_the_morphs() -> None:
    morphed = apply_morph(applied(), SPEC, morph_named("grow")).target  # 4 vCPUs, base 2
    spec = compile_vm(FLOW.replace("cpu    = 2 .. 8", "cpu    = 3 .. 8"))
    want = desired_state(spec, PROGRAM)
    assert base_changed(want, morphed) == ["cpu"] and reset_on_base_change(want, morphed)
    _, change = plan_one(want, morphed)
    assert change.action is Action.UPDATE_LIVE
    assert change.reasons == (Reason.CPU_LIVE, Reason.MORPHS_RESET)
    assert change.after == want and change.after.vcpus == 3 and change.after.owner.morphs == ()


def test_a_base_change_to_where_the_morph_went_still_drops_the_record() -> None:
    morphed = apply_morph(applied(), SPEC, morph_named("grow")).target  # 4 vCPUs
    spec = compile_vm(FLOW.replace("cpu    = 2 .. 8", "cpu    = 4 .. 8"))
    _, change = plan_one(desired_state(spec, PROGRAM), morphed)
    assert change.action is Action.UPDATE_LIVE and change.reasons == (Reason.MORPHS_RESET,)


def test_a_base_change_under_an_os_swap_swaps_back_with_a_restart() -> None:
    # As observed, the image of a VM under an OS swap is the recorded base image.
    morphed = replace(apply_morph(applied(), SPEC, morph_named("bigger")).target, image="linux-base")
    spec = compile_vm(FLOW.replace("memory = 4GiB .. 16GiB", "memory = 8GiB .. 16GiB"))
    want = desired_state(spec, PROGRAM)
    _, change = plan_one(want, morphed)
    assert change.action is Action.UPDATE_RESTART
    assert change.reasons == (Reason.MEMORY_LIVE, Reason.IMAGE, Reason.MORPHS_RESET)
    assert change.restart_paths == ("image",) and change.after.image == "linux-base"


def test_a_new_declared_disk_is_a_base_change() -> None:
    morphed = apply_morph(applied(), SPEC, morph_named("scratch")).target
    spec = compile_vm(FLOW.replace("disk data { size = 20GiB }", "disk data { size = 20GiB }\n"
                                   "  disk logs { size = 5GiB }"))
    want = desired_state(spec, PROGRAM)
    assert base_changed(want, morphed) == ["disk_sizes"]
    _, change = plan_one(want, morphed)
    assert Reason.MORPHS_RESET in change.reasons and Reason.DISK_ADD in change.reasons
    assert Reason.DISK_REMOVE in change.reasons  # the scratch disk the morph attached goes too


def test_a_morphed_vm_changed_by_hand_goes_back_to_the_base() -> None:
    morphed = apply_morph(applied(), SPEC, morph_named("grow")).target
    by_hand = replace(morphed, memory_kib=6 * GIB_KIB)
    want = desired_state(SPEC, PROGRAM)
    assert not reset_on_base_change(want, by_hand)  # the base is as applied...
    p, change = plan_one(want, by_hand)
    # ...but applying the program brings the VM to its base, which drops the morphs: the plan says so.
    assert change.reasons == (Reason.CPU_LIVE, Reason.MEMORY_LIVE, Reason.MORPHS_RESET)
    assert [(d.path, d.actual) for d in p.drift] == [("memory", 6 * GIB_KIB)]


def test_without_a_recorded_base_no_base_change_is_seen() -> None:
    morphed = apply_morph(applied(), SPEC, morph_named("grow")).target
    no_base = replace(morphed, owner=replace(morphed.owner, base={}))
    spec = compile_vm(FLOW.replace("cpu    = 2 .. 8", "cpu    = 3 .. 8"))
    assert base_changed(desired_state(spec, PROGRAM), no_base) == []


def test_the_base_record_has_the_keys_apply_writes() -> None:
    vm = desired_state(SPEC, PROGRAM)
    assert base_of(vm) == {"cpu": 2, "cpu.bound": 8, "memory": 4 * GIB_KIB, "memory.bound": 16 * GIB_KIB,
                           "image": "linux-base", "pool": None, "disk_sizes": {"data": 20 * GIB_KIB}}


def test_percent_constants_keep_their_dimension() -> None:
    cond = morph_named("grow").condition
    assert isinstance(cond, M.Cmp) and cond.right.dim is Dimension.PERCENT and cond.window == 300
