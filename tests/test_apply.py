"""plan and apply on libvirt's test driver (a real driver, embedded, persisted in a state folder)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from cli_runner import TWO_VMS, vmflow
from controller import domain_xml, embedded
from controller.apply import Applier, ApplyRefused
from controller.context import image_repo, load, make_plan, open_store
from controller.hypervisor import Hypervisor, HypervisorError
from controller.plan import Action, Reason
from tests.integration.harness import unavailable

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = TWO_VMS




@pytest.fixture
def prog(tmp_path: Path) -> Path:
    d = tmp_path / "prog"
    d.mkdir()
    (d / "main.flow").write_text(PROGRAM)
    return d


def edit(prog: Path, old: str, new: str) -> None:
    f = prog / "main.flow"
    text = f.read_text()
    assert old in text
    f.write_text(text.replace(old, new, 1))


def observe(prog: Path):
    with Hypervisor(embedded.uri(prog / ".vmflow")) as hv:
        return hv.observe()


def test_apply_then_plan_in_new_processes_is_empty(prog):
    r = vmflow("plan", ".", cwd=prog)
    assert r.returncode == 2, r.stderr
    assert "Plan: 2 to add, 0 to change (0 live, 0 restart), 0 to replace, 0 to destroy." in r.stdout
    r = vmflow("apply", ".", "--auto-approve", cwd=prog)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Apply complete" in r.stdout and "2 applied" in r.stdout
    r = vmflow("plan", ".", cwd=prog)
    assert r.returncode == 0, r.stdout
    assert "No changes." in r.stdout
    r = vmflow("apply", ".", "--auto-approve", cwd=prog)
    assert r.returncode == 0 and "No changes." in r.stdout
    vms = observe(prog).vms
    assert vms["web"].vcpus == 2 and vms["web"].max_vcpus == 8
    assert vms["web"].memory_kib == 2 * 1024 * 1024 and vms["web"].max_memory_kib == 8 * 1024 * 1024
    assert [n.name for n in vms["web"].nics] == ["lan"]


def test_live_and_restart_changes_are_classed_and_applied(prog):
    assert vmflow("apply", ".", "--auto-approve", cwd=prog).returncode == 0
    edit(prog, "cpu    = 2 .. 8", "cpu    = 4 .. 8")          # within the maximum: live
    edit(prog, "cpu    = 1 .. 4", "cpu    = 1 .. 6")          # a new maximum: restart
    r = vmflow("plan", ".", "--format", "json", cwd=prog)
    assert r.returncode == 2
    doc = json.loads(r.stdout)
    by = {c["address"]: c for c in doc["changes"]}
    assert by["vm.web"]["actions"] == ["update-live"] and by["vm.web"]["reason"] == ["cpu-live"]
    assert by["vm.api"]["actions"] == ["update-restart"] and by["vm.api"]["forces_restart"] == ["cpu.bound"]
    r = vmflow("apply", ".", "--auto-approve", cwd=prog)
    assert r.returncode == 0, r.stdout + r.stderr
    vms = observe(prog).vms
    assert vms["web"].vcpus == 4 and vms["api"].max_vcpus == 6
    assert any(s.startswith("vmflow-") for s in vms["web"].snapshots)
    assert vmflow("plan", ".", cwd=prog).returncode == 0


def test_prune_is_opt_in_and_mass_delete_is_guarded(prog):
    assert vmflow("apply", ".", "--auto-approve", cwd=prog).returncode == 0
    text = (prog / "main.flow").read_text()
    (prog / "main.flow").write_text(text[: text.index("vm api")])
    r = vmflow("plan", ".", cwd=prog)
    assert r.returncode == 0 and "kept because --prune is not set" in r.stdout
    r = vmflow("apply", ".", "--prune", "--auto-approve", cwd=prog)
    assert r.returncode == 0, r.stdout + r.stderr
    assert set(observe(prog).vms) == {"web"}
    (prog / "main.flow").write_text(text[: text.index("vm web")])
    r = vmflow("plan", ".", "--prune", cwd=prog)
    assert r.returncode == 1 and "--allow-mass-delete" in r.stdout
    assert vmflow("apply", ".", "--prune", "--allow-mass-delete", "--auto-approve", cwd=prog).returncode == 0
    assert observe(prog).vms == {}


def test_unmanaged_domains_are_listed_and_never_touched(prog):
    state = prog / ".vmflow"
    with Hypervisor(embedded.uri(state)) as hv:
        hv.define("<domain type='test'><name>handmade</name><memory unit='KiB'>1024</memory>"
                  "<vcpu>1</vcpu><os><type>hvm</type></os></domain>")
        embedded.save(state, hv.export())
    r = vmflow("apply", ".", "--prune", "--allow-mass-delete", "--auto-approve", cwd=prog)
    assert r.returncode == 0
    assert "1 domain not managed by vmflow left alone" in r.stdout
    actual = observe(prog)
    assert [u.name for u in actual.unmanaged] == ["handmade"]
    edit(prog, "vm api {", "vm handmade {")
    r = vmflow("plan", ".", cwd=prog)
    assert r.returncode == 1 and "is not managed by vmflow" in r.stdout


def test_saved_plan_applies_exactly_and_refuses_when_stale(prog, tmp_path):
    plan_file = tmp_path / "p.json"
    assert vmflow("plan", ".", "-o", str(plan_file), cwd=prog).returncode == 2
    r = vmflow("apply", str(plan_file), cwd=prog)
    assert r.returncode == 0, r.stdout + r.stderr
    edit(prog, "cpu    = 2 .. 8", "cpu    = 3 .. 8")
    assert vmflow("plan", ".", "-o", str(plan_file), cwd=prog).returncode == 2
    with Hypervisor(embedded.uri(prog / ".vmflow")) as hv:  # someone changes the VM meanwhile
        hv.set_vcpus("web", 5, live=True)
        embedded.save(prog / ".vmflow", hv.export())
    r = vmflow("apply", str(plan_file), cwd=prog)
    assert r.returncode == 1 and "stale" in r.stderr


def test_drift_is_reported_first(prog):
    assert vmflow("apply", ".", "--auto-approve", cwd=prog).returncode == 0
    with Hypervisor(embedded.uri(prog / ".vmflow")) as hv:
        hv.set_vcpus("web", 3, live=True)
        embedded.save(prog / ".vmflow", hv.export())
    r = vmflow("plan", ".", cwd=prog)
    assert r.returncode == 2
    assert r.stdout.startswith("Drift:")
    assert "vm.web  cpu: applied 2, now 3" in r.stdout


def test_apply_without_approval_on_a_pipe_refuses(prog):
    r = vmflow("apply", ".", cwd=prog)
    assert r.returncode == 1 and "--auto-approve" in r.stderr
    assert observe(prog).vms == {}


# ------------------------------------------------------------------------------------------ faults


class Faulty(Hypervisor):
    """Fails the n-th libvirt call (every public method of the adapter, reads and writes alike, counted from
    `arm()`) once, as a libvirt error would."""

    # Not libvirt calls an apply makes: closing the connection, and the embedded default's own save.
    NOT_CALLS = ("close", "export")

    def __init__(self, uri: str, fail_at: int) -> None:
        super().__init__(uri)
        self.fail_at = fail_at
        self.calls: list[str] | None = None
        for m, v in vars(Hypervisor).items():
            if callable(v) and not m.startswith("_") and m not in self.NOT_CALLS:
                setattr(self, m, self._wrap(m, getattr(self, m)))

    def arm(self) -> None:
        self.calls = []

    def _wrap(self, name, fn):
        def call(*a, **kw):
            if self.calls is not None:
                self.calls.append(name)
                if len(self.calls) == self.fail_at:
                    raise HypervisorError(name, "injected failure")
            return fn(*a, **kw)
        return call


def image_root(tmp_path: Path, *images: str) -> Path:
    """An image root with a real 1 MiB qcow2 per image, so that apply makes real overlays and data disks."""
    if shutil.which("qemu-img") is None:
        unavailable("qemu-img is not installed (scripts/setup-libvirt.sh installs it)")
    root = tmp_path / "image-root"
    root.mkdir()
    for image in images:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(root / f"{image}.qcow2"), "1M"], check=True)
    return root


def _shape(v) -> tuple:
    return (v.vcpus, v.max_vcpus, v.memory_kib, v.running, v.image, tuple(sorted(d.name for d in v.disks)),
            tuple(sorted(n.name for n in v.nics)))


def _snapshot(prog: Path) -> dict:
    return {n: _shape(v) for n, v in observe(prog).vms.items()}


def _orphans(hv: Hypervisor, disks: Path) -> set[str]:
    """Disk files vmflow made that no domain and no snapshot names."""
    named = set().union(*(hv.disk_files(n) for n in hv.observe().vms))
    return {str(f) for f in disks.rglob("*.qcow2")} - named


def _lost(hv: Hypervisor, disks: Path) -> set[str]:
    """Files under `disks/` that a domain or a snapshot names but that are gone: cleanup took too much."""
    named = set().union(*(hv.disk_files(n) for n in hv.observe().vms))
    return {f for f in named if f.startswith(str(disks)) and not Path(f).is_file()}


def test_every_failing_call_leaves_each_vm_before_or_after(prog, tmp_path):
    """For every libvirt call an apply makes, a run where that call fails once leaves every VM exactly as it
    was before or exactly as desired, and the next apply converges. The change set covers every kind: a
    new VM, a live vCPU change, and a restart with an OS swap, a new data disk, a NIC and more memory; the image files are
    real, so boot overlays and data disks are made, and none is left behind that nothing names. (The test
    driver hot-plugs no devices: the disk and NIC come with the restart; tests/integration covers hotplug.)"""
    root = image_root(tmp_path, "linux-base", "linux-base-large")
    assert vmflow("apply", ".", "--auto-approve", "--image-root", str(root), cwd=prog).returncode == 0
    edit(prog, "cpu    = 2 .. 8", "cpu    = 4 .. 8")
    edit(prog, "memory = 1GiB .. 4GiB", "memory = 2GiB .. 4GiB\n\n  disk data {\n    size = 1GiB\n  }\n\n"
                                        "  nic wan {\n    network = \"default\"\n  }")
    edit(prog, "vm api {\n  image  = linux-base", "vm api {\n  image  = linux-base-large")
    edit(prog, "vm api {", "vm api2 {\n  image  = linux-base\n  cpu    = 1\n  memory = 1GiB\n}\n\nvm api {")
    before = _snapshot(prog)
    t = load(prog, None, None, image_root=root)
    desired = {n: (v.vcpus, v.max_vcpus, v.memory_kib, True, v.image, tuple(sorted(d.name for d in v.disks)),
                   tuple(sorted(n.name for n in v.nics))) for n, v in t.desired.items()}
    state = prog / ".vmflow"
    disks = state / "disks"
    original = (state / "hypervisor.xml").read_text()
    original_disks = {f.relative_to(disks): f.read_bytes() for f in disks.rglob("*") if f.is_file()}
    assert sorted(str(f.parent) for f in original_disks) == ["api", "web"]  # their boot overlays

    def reset() -> None:
        (state / "hypervisor.xml").write_text(original)
        shutil.rmtree(disks)
        for name, data in original_disks.items():
            (disks / name).parent.mkdir(parents=True, exist_ok=True)
            (disks / name).write_bytes(data)

    said: list[str] = []

    def applier(hv: Hypervisor) -> Applier:
        return Applier(hv, open_store(t), keep_snapshots=3, images=image_repo(t, hv), progress=said.append,
                       saved=lambda: embedded.save(state, hv.export()))

    with Faulty(t.uri, fail_at=0) as hv:
        plan, _ = make_plan(t, hv)
        assert {c.action for c in plan.actionable} == {Action.CREATE, Action.UPDATE_LIVE, Action.UPDATE_RESTART}
        hv.arm()
        applier(hv).apply(plan, t.program)
        calls = list(hv.calls)
    assert _snapshot(prog) == desired
    assert len(calls) >= 20 and {"define", "start", "shutdown", "snapshot", "set_vcpus", "set_owner",
                                 "observe_vm", "disk_files"} <= set(calls), calls
    for n in range(1, len(calls) + 1):
        reset()
        with Faulty(t.uri, fail_at=n) as hv:
            plan, _ = make_plan(t, hv)
            hv.arm()
            said.clear()
            try:
                # A failure after the change is applied (pruning old snapshots and files) costs only disk
                # space: it is said, and the change counts as applied.
                reported = not applier(hv).apply(plan, t.program).ok or any("could not" in m for m in said)
            except (HypervisorError, ApplyRefused):
                reported = True
            failed = hv.calls[n - 1] if len(hv.calls) >= n else None
            assert failed is None or reported, f"call {n} ({failed}) failed without a report"
        after = _snapshot(prog)
        for name in set(before) | set(desired):
            got = after.get(name)
            assert got in (before.get(name), desired.get(name)), (n, failed, name, got)
        with Hypervisor(t.uri) as hv:
            # A rolled-back change takes its new files with it; only a failure of the very listing that
            # cleanup needs leaves one, for the next successful change of that VM to remove.
            if failed != "disk_files":
                assert _orphans(hv, disks) == set(), (n, failed)
            assert _lost(hv, disks) == set(), (n, failed)
            plan, _ = make_plan(t, hv)
            applier(hv).apply(plan, t.program)
        assert _snapshot(prog) == desired, (n, failed)
        with Hypervisor(t.uri) as hv:
            assert not make_plan(t, hv)[0].actionable
            # Nothing left behind: at most the kept snapshots per VM, no file nothing names, no journal
            # intent, no half-written state file.
            for vm in hv.observe().vms.values():
                assert len([s for s in vm.snapshots if s.startswith("vmflow-")]) <= 3, (n, vm.name, vm.snapshots)
            assert _orphans(hv, disks) == set(), (n, failed)
            assert _lost(hv, disks) == set(), (n, failed)
        assert open_store(t).unfinished() == []
        assert list(state.glob(".hypervisor-*.xml")) == []


def test_interrupted_apply_is_rolled_back_by_the_next_run(prog):
    """A journal intent without an outcome (the process died) is settled first, and said."""
    assert vmflow("apply", ".", "--auto-approve", cwd=prog).returncode == 0
    t = load(prog, None, None)
    state = prog / ".vmflow"
    with Hypervisor(t.uri) as hv:
        store = open_store(t)
        hv.snapshot("web", "vmflow-dead")
        store.intent("dead", "vm.web", "update-live", "vmflow-dead", None)
        hv.set_vcpus("web", 7, live=True)  # half-applied, then the process "died"
        embedded.save(state, hv.export())
    r = vmflow("apply", ".", "--auto-approve", cwd=prog)
    assert "recovered: vm.web: an interrupted update-live was rolled back to snapshot vmflow-dead" in r.stdout
    assert observe(prog).vms["web"].vcpus == 2


def test_an_interrupted_create_is_removed_with_its_files(prog, tmp_path):
    """A create killed after its domain was defined: the next run removes the domain and the files made
    for it (boot overlay and data disk), then creates the VM afresh."""
    root = image_root(tmp_path, "linux-base")
    assert vmflow("apply", ".", "--auto-approve", "--image-root", str(root), cwd=prog).returncode == 0
    edit(prog, "vm api {", "vm api2 {\n  image  = linux-base\n  cpu    = 1\n  memory = 1GiB\n"
                           "  disk logs {\n    size = 1GiB\n  }\n}\n\nvm api {")
    t = load(prog, None, None, image_root=root)
    state = prog / ".vmflow"
    with Hypervisor(t.uri) as hv:
        repo = image_repo(t, hv)
        want = t.desired["api2"]
        overlay = repo.boot_disk("api2", "linux-base")
        data = repo.data_disk("api2", want.disks[0])
        open_store(t).intent("dead", "vm.api2", "create", None, None)
        hv.define(domain_xml.render(want, domain_type=hv.domain_type, boot_disk=overlay,
                                    disk_paths={"logs": data}))
        embedded.save(state, hv.export())  # then the process "died"
    r = vmflow("apply", ".", "--auto-approve", "--image-root", str(root), cwd=prog)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "recovered: vm.api2: an interrupted create was rolled back" in r.stdout
    assert "1 applied" in r.stdout
    assert not Path(overlay).exists() and not Path(data).exists()
    files = sorted(str(f.relative_to(state / "disks")) for f in (state / "disks").rglob("*.qcow2"))
    assert [(f.split("/")[0], f.split("/")[1].split("-")[0]) for f in files] == \
        [("api", "boot"), ("api2", "boot"), ("api2", "data"), ("web", "boot")], files
    assert observe(prog).vms["api2"].running


def test_an_interrupted_update_leaves_no_file_it_made(prog, tmp_path):
    """An OS swap killed after its new overlay was made, before the domain named it: the next run reverts
    to the snapshot and deletes the overlay; the VM's old files stay."""
    root = image_root(tmp_path, "linux-base", "linux-base-large")
    assert vmflow("apply", ".", "--auto-approve", "--image-root", str(root), cwd=prog).returncode == 0
    t = load(prog, None, None, image_root=root)
    state = prog / ".vmflow"
    with Hypervisor(t.uri) as hv:
        old = set(hv.disk_files("web"))
        hv.snapshot("web", "vmflow-dead")
        open_store(t).intent("dead", "vm.web", "update-restart", "vmflow-dead", None)
        new = image_repo(t, hv).boot_disk("web", "linux-base-large")
        embedded.save(state, hv.export())  # then the process "died"
    assert Path(new).exists() and old
    r = vmflow("apply", ".", "--auto-approve", "--image-root", str(root), cwd=prog)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "recovered: vm.web: an interrupted update-restart was rolled back to snapshot vmflow-dead" in r.stdout
    assert not Path(new).exists()
    assert all(Path(f).exists() for f in old)
    assert {str(f) for f in (state / "disks" / "web").iterdir()} == old


def test_lock_is_exclusive_and_says_who(prog):
    t = load(prog, None, None)
    store = open_store(t)
    store.acquire(t.program, "alice", "vmflow apply (by hand)")
    try:
        r = vmflow("apply", ".", "--auto-approve", cwd=prog)
        assert r.returncode == 1
        assert "another apply of `prog` is running: held by alice" in r.stderr
    finally:
        store.release(t.program)
    assert vmflow("apply", ".", "--auto-approve", cwd=prog).returncode == 0


def test_domain_xml_round_trip():
    t_xml = domain_xml.render
    from controller.state import DiskState, NicState, Ownership, VmState

    vm = VmState("a", "linux-base", 2, 8, 1024, 4096, (DiskState("data", 2048, None),),
                 (NicState("lan", "default", None, "virtio"),), owner=Ownership("p", "vm.a", "abc"), pool="r")
    back = domain_xml.parse(t_xml(vm), running=True)
    assert (back.vcpus, back.max_vcpus, back.memory_kib, back.max_memory_kib) == (2, 8, 1024, 4096)
    assert [d.name for d in back.disks] == ["data"] and back.disks[0].size_kib == 2048
    assert [n.name for n in back.nics] == ["lan"] and back.owner.revision == "abc" and back.pool == "r"


@pytest.mark.parametrize("reason", list(Reason))
def test_every_reason_is_documented(reason):
    text = (ROOT / "specs" / "plan.md").read_text() if (ROOT / "specs" / "plan.md").exists() else ""
    assert f"`{reason.value}`" in text, f"specs/plan.md does not document `{reason.value}`"


@pytest.mark.parametrize("action", list(Action))
def test_every_action_has_a_symbol(action):
    assert action.symbol


def test_parallel_apply_converges(prog):
    """Independent VMs changed several at a time: same result, one journal outcome each."""
    text = (prog / "main.flow").read_text()
    extra = "".join(f"\nvm w{i} {{\n  image  = linux-base\n  pool   = rack1\n  cpu    = 1 .. 2\n  memory = 1GiB\n}}\n"
                    for i in range(12))
    (prog / "main.flow").write_text(text + extra)
    r = vmflow("apply", ".", "--auto-approve", "--parallelism", "6", cwd=prog)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "14 applied" in r.stdout
    assert len(observe(prog).vms) == 14
    assert vmflow("plan", ".", cwd=prog).returncode == 0
    t = load(prog, None, None)
    assert open_store(t).unfinished() == []


def test_another_programs_vm_is_never_taken_over(tmp_path):
    """Two programs share one hypervisor: the second may not plan a VM whose name the first owns."""
    state = tmp_path / "state"
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "main.flow").write_text(TWO_VMS)
    assert vmflow("apply", "one", "--state-dir", str(state), "--auto-approve", cwd=tmp_path).returncode == 0
    r = vmflow("plan", "two", "--state-dir", str(state), cwd=tmp_path)
    assert r.returncode == 1
    assert "belongs to the vmflow program `one`" in r.stdout
    r = vmflow("apply", "two", "--state-dir", str(state), "--prune", "--allow-mass-delete", "--auto-approve",
               cwd=tmp_path)
    assert r.returncode == 1
    with Hypervisor(embedded.uri(state)) as hv:
        assert {v.owner.program for v in hv.observe().vms.values()} == {"one"}
