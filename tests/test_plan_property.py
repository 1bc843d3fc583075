"""Property tests of planning and applying.

The pure planner, on random desired and actual states: it never raises, it accounts for every desired VM
exactly once, it deletes only owned VMs and only with prune, and it never changes an unmanaged domain.

Plan and apply on libvirt's test driver (embedded in a node file in a temporary folder, as `vmflow` runs
it): from a random starting point (the VMs of an earlier random program, some stopped or changed by hand,
and perhaps a domain vmflow does not own), applying a random program and planning again finds nothing to
do, and a second apply changes nothing. A program that declares a VM named like the unmanaged domain is not
applyable, and apply refuses it without changing anything.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from controller import embedded
from controller.apply import Applier, ApplyRefused
from controller.context import load, make_plan, open_store
from controller.hypervisor import Hypervisor
from controller.plan import Action, Options, Plan, Reason, plan
from controller.state import ActualState, DiskState, NicState, Ownership, Unmanaged, VmState

GIB_KIB = 1024 * 1024
PROGRAM = "prog"

# A handful of names, so that desired, actual and unmanaged overlap often.
VM_NAMES = ("a", "b", "c", "web", "db", "api")
MORPHS = ("cpu:grow", "memory:more", "image:swap", "disk.scratch:attach", "nic.lan:move", "cpu.bound:x")

# ------------------------------------------------------------------------------------------ pure planner


@st.composite
def vm_states(draw, name: str, owned: bool) -> VmState:
    max_vcpus = draw(st.integers(1, 16))
    max_mem = draw(st.integers(1, 16)) * GIB_KIB
    disks = tuple(DiskState(n, draw(st.sampled_from((0, 10 * GIB_KIB, 20 * GIB_KIB))), None)
                  for n in draw(st.lists(st.sampled_from(("data", "logs", "scratch")), unique=True, max_size=2)))
    nics = tuple(NicState(n, *draw(st.sampled_from((("default", None), ("backend", None), (None, "br0")))),
                          draw(st.sampled_from(("virtio", "e1000"))))
                 for n in draw(st.lists(st.sampled_from(("lan", "wan")), unique=True, max_size=2)))
    owner = None
    if owned:
        base = draw(st.fixed_dictionaries({}, optional={
            "cpu": st.integers(1, 16), "cpu.bound": st.integers(1, 16),
            "memory": st.integers(1, 16).map(lambda g: g * GIB_KIB),
            "memory.bound": st.integers(1, 16).map(lambda g: g * GIB_KIB)}))
        owner = Ownership(PROGRAM, f"vm.{name}", draw(st.none() | st.just("r1")), base,
                          tuple(draw(st.lists(st.sampled_from(MORPHS), unique=True, max_size=2))),
                          tuple(n.name for n in nics))
    return VmState(
        name=name, image=draw(st.sampled_from(("linux-base", "linux-base-large"))),
        vcpus=draw(st.integers(1, max_vcpus)), max_vcpus=max_vcpus,
        memory_kib=draw(st.integers(1, max_mem // GIB_KIB)) * GIB_KIB, max_memory_kib=max_mem,
        disks=disks, nics=nics, running=draw(st.booleans()), owner=owner,
        pool=draw(st.sampled_from((None, "rack1", "rack2"))))


@st.composite
def planner_inputs(draw) -> tuple[dict[str, VmState], ActualState, Options]:
    desired_names = draw(st.lists(st.sampled_from(VM_NAMES), unique=True, max_size=5))
    desired = {n: draw(vm_states(n, owned=True)) for n in desired_names}
    # libvirt names are unique: a name is owned by this program or unmanaged, never both.
    taken = draw(st.lists(st.sampled_from(VM_NAMES), unique=True, max_size=6))
    split = draw(st.integers(0, len(taken)))
    vms = {n: draw(vm_states(n, owned=True)) for n in taken[:split]}
    unmanaged = tuple(Unmanaged(n, f"uuid-{n}", draw(st.booleans())) for n in taken[split:])
    capacity = st.none() | st.tuples(st.none() | st.integers(0, 64),
                                     st.none() | st.integers(0, 64).map(lambda g: g * GIB_KIB))
    pools = {p: c for p in ("rack1", "rack2") if (c := draw(capacity)) is not None}
    opts = Options(prune=draw(st.booleans()), allow_mass_delete=draw(st.booleans()),
                   mass_delete_share=draw(st.sampled_from((0.0, 0.5, 1.0))), device_hotplug=draw(st.booleans()),
                   pools=pools)
    return desired, ActualState(vms, unmanaged, "test:///property"), opts


def _name(address: str) -> str:
    return address.split(".", 1)[1]


@settings(max_examples=300, deadline=None)
@given(planner_inputs())
def test_planner_accounts_for_every_vm_and_touches_only_owned_ones(inputs) -> None:
    desired, actual, opts = inputs
    p = plan(desired, actual, opts)
    assert isinstance(p, Plan)
    addresses = [c.address for c in p.changes]
    assert len(addresses) == len(set(addresses)), "a VM has two changes"

    vm_problems = [pr.address for pr in p.problems if pr.address.startswith("vm.")]
    for name in desired:
        seen = addresses.count(f"vm.{name}") + vm_problems.count(f"vm.{name}")
        assert seen == 1, f"vm.{name} appears {seen} times among changes and problems"

    unmanaged = {u.name for u in actual.unmanaged}
    assert not unmanaged & {_name(a) for a in addresses}, "an unmanaged domain is changed"
    for name in desired.keys() & unmanaged:
        assert f"vm.{name}" in vm_problems and not p.applyable

    gone = sorted(actual.vms.keys() - desired.keys())
    deleted = sorted(_name(c.address) for c in p.changes if c.action is Action.DELETE)
    assert set(deleted) <= set(gone), "a delete touches a VM that is declared or not owned"
    if deleted:
        assert opts.prune
        assert deleted == gone and not p.held_deletes
        assert opts.allow_mass_delete or len(gone) / len(actual.vms) <= opts.mass_delete_share
    else:
        assert list(p.held_deletes) == gone, "an owned, undeclared VM is neither deleted nor kept"

    for c in p.changes:
        name = _name(c.address)
        if c.action is Action.CREATE:
            assert name not in actual.vms and c.after == desired[name] and c.reasons == (Reason.NOT_FOUND,)
        elif c.action is Action.DELETE:
            assert c.after is None and c.before == actual.vms[name]
        else:
            assert c.before == actual.vms[name] and c.after == desired[name]
        assert bool(c.replace_paths) == (c.action is Action.REPLACE)
        if c.action is Action.UPDATE_RESTART:
            assert c.restart_paths
        if c.action is Action.NOOP:
            assert c.reasons in ((), (Reason.MORPHED,))
        else:
            assert c.reasons, f"{c.address}: {c.action.value} without a reason"
    assert p.applyable == (not p.problems)


# ------------------------------------------------------------------------------------------ test driver

UNMANAGED_XML = ("<domain type='test'><name>{name}</name><memory unit='KiB'>1048576</memory><vcpu>1</vcpu>"
                 "<os><type>hvm</type></os></domain>")


FLOW_NAMES = ("a", "b", "c", "web", "db")
POOL = 'pool rack1 {\n  host   = "test:///default"\n  cpu    = 4096\n  memory = 65536GiB\n}'


@st.composite
def flow_vms(draw) -> tuple:
    """One VM's sizes and NICs: (cpu, memory, nics) as they are written in `.flow`."""
    lo = draw(st.integers(1, 16))
    hi = draw(st.integers(lo, 16))
    mlo = draw(st.integers(1, 16))
    mhi = draw(st.integers(mlo, 16))
    cpu = f"{lo}" if lo == hi and draw(st.booleans()) else f"{lo} .. {hi}"
    memory = f"{mlo}GiB" if mlo == mhi and draw(st.booleans()) else f"{mlo}GiB .. {mhi}GiB"
    nics = draw(st.lists(st.tuples(st.sampled_from(("lan", "wan", "storage")),
                                   st.sampled_from(("default", "backend"))),
                         unique_by=lambda n: n[0], max_size=2))
    return cpu, memory, tuple(nics)


def flow_text(vms: dict[str, tuple]) -> str:
    """A program of one pool on the embedded default and these VMs."""
    blocks = [POOL]
    for name, (cpu, memory, nics) in vms.items():
        lines = [f"vm {name} {{", "  image  = linux-base", "  pool   = rack1", f"  cpu    = {cpu}",
                 f"  memory = {memory}"]
        for nic, network in nics:
            lines += ["", f"  nic {nic} {{", f'    network = "{network}"', "  }"]
        blocks.append("\n".join(lines + ["}"]))
    return "\n\n".join(blocks) + "\n"


@st.composite
def scenarios(draw) -> dict:
    """A program, and what the hypervisor holds before it is applied: mostly the VMs of an earlier version
    of the program (some the same, some sized differently, some no longer declared), then changed by hand
    (VMs stopped, vCPUs changed), and perhaps a domain vmflow does not own, which may clash with a VM."""
    names = draw(st.lists(st.sampled_from(FLOW_NAMES), unique=True, min_size=1, max_size=4))
    vms = {n: draw(flow_vms()) for n in names}
    earlier = None
    if draw(st.sampled_from((True, True, True, False))):
        before = {}
        for n in names:
            how = draw(st.sampled_from(("resized", "same", "resized", "absent")))
            if how != "absent":
                before[n] = vms[n] if how == "same" else draw(flow_vms())
        others = [n for n in FLOW_NAMES if n not in names]
        for n in draw(st.lists(st.sampled_from(others), unique=True, max_size=2)) if others else ():
            before[n] = draw(flow_vms())
        earlier = flow_text(before) if before else None
    return {
        "program": flow_text(vms),
        "earlier": earlier,
        "stop": draw(st.lists(st.sampled_from(FLOW_NAMES), unique=True, max_size=2)),
        "drift": draw(st.lists(st.tuples(st.sampled_from(FLOW_NAMES), st.integers(1, 16)),
                               unique_by=lambda d: d[0], max_size=2)),
        "unmanaged": draw(st.none() | st.sampled_from(("handmade", "web"))),
        "unmanaged_running": draw(st.booleans()),
        "prune": draw(st.booleans()),
    }


def _apply(t, hv: Hypervisor, p: Plan):
    store = open_store(t)
    try:
        return Applier(hv, store, saved=lambda: embedded.save(t.state_dir, hv.export())).apply(p, t.program)
    finally:
        store.close()


def _prepare(prog: Path, state: Path, start: dict) -> None:
    if start["earlier"] is not None:
        (prog / "main.flow").write_text(start["earlier"])
        t = load(prog, None, state)
        assert t.compilation.ok, t.compilation.diagnostics
        with Hypervisor(t.uri) as hv:
            p, _ = make_plan(t, hv)
            assert _apply(t, hv, p).ok
    with Hypervisor(embedded.uri(state)) as hv:
        vms = hv.observe().vms
        for name, n in start["drift"]:
            if name in vms:
                hv.set_vcpus(name, min(n, vms[name].max_vcpus), live=vms[name].running)
        for name in start["stop"]:
            if name in vms:
                hv.stop(name)
        if start["unmanaged"] and start["unmanaged"] not in vms:
            hv.define(UNMANAGED_XML.format(name=start["unmanaged"]))
            if start["unmanaged_running"]:
                hv.start(start["unmanaged"])
        embedded.save(state, hv.export())


def _observed(t) -> ActualState:
    with Hypervisor(t.uri) as hv:
        return hv.observe()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_apply_then_plan_is_empty_on_the_test_driver(start: dict) -> None:
    prune = start["prune"]
    with tempfile.TemporaryDirectory() as d:
        prog, state = Path(d) / PROGRAM, Path(d) / "state"
        prog.mkdir()
        _prepare(prog, state, start)
        (prog / "main.flow").write_text(start["program"])
        t = load(prog, None, state)
        assert t.compilation.ok, t.compilation.diagnostics
        before = _observed(t)
        unmanaged = {u.name: u for u in before.unmanaged}

        with Hypervisor(t.uri) as hv:
            p, _ = make_plan(t, hv, prune=prune, allow_mass_delete=True)
            for c in p.actionable:
                event(f"plans {c.action.value}")
            if set(t.desired) & set(unmanaged):
                event("name clash with an unmanaged domain")
                assert not p.applyable
                try:
                    _apply(t, hv, p)
                except ApplyRefused:
                    pass
                else:
                    raise AssertionError("a plan with a name clash was applied")
                assert _observed(t) == before
                return
            assert p.applyable, p.problems
            result = _apply(t, hv, p)
            assert result.ok, [(o.address, o.result, o.detail) for o in result.outcomes]
            assert len(result.outcomes) == len(p.actionable)

        # A new connection reads the node file again, as the next `vmflow` process would.
        settled = _observed(t)
        with Hypervisor(t.uri) as hv:
            again, _ = make_plan(t, hv, prune=prune, allow_mass_delete=True)
            assert not again.actionable, [(c.address, c.action.value, c.reasons) for c in again.actionable]
            assert not again.drift and not again.problems
            assert all(c.reasons == () for c in again.changes)
            second = _apply(t, hv, again)
            assert second.outcomes == [] and second.recovered == []
        after = _observed(t)
        assert after == settled, "a second apply changed the hypervisor"

        assert {u.name: u for u in after.unmanaged} == unmanaged, "an unmanaged domain was changed"
        undeclared = set(before.vms) - set(t.desired)
        assert set(after.vms) == set(t.desired) | (set() if prune else undeclared)
        for name, want in t.desired.items():
            got = after.vms[name]
            assert got.running
            assert (got.vcpus, got.max_vcpus, got.memory_kib, got.max_memory_kib) == \
                (want.vcpus, want.max_vcpus, want.memory_kib, want.max_memory_kib)
            # By name, not by position: an update keeps the NICs a VM has in their slots and adds new ones after.
            assert {n.name: n.network for n in got.nics} == {n.name: n.network for n in want.nics}
            assert got.owner.program == PROGRAM and got.owner.morphs == ()
