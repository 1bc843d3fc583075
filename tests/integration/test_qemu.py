"""`vmflow apply` on a real QEMU (`qemu:///system`, TCG) with the tiny guest, checked from inside the guest.

One VM is created and then changed step by step, each test building on the previous one (a TCG domain
costs seconds to boot): create, vCPU hotplug, balloon, disk and NIC hotplug, an OS swap that keeps the UUID
and MAC, an OS swap whose health check fails and is rolled back by the snapshot, and a rollback after a vCPU
hotplug. Every effect is read inside the guest through the guest agent.

Needs libvirtd and the guest (scripts/setup-libvirt.sh, scripts/build-guest.sh /var/lib/vmflow-guest; `make
test` runs both as root). Without them the tests are skipped, and under `CI=true` they fail.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.integration.harness import (
    CMDLINE,
    GUEST_DIR,
    IMAGE,
    URI,
    InGuest,
    Timings,
    discard,
    make_work,
    open_qemu,
)

BRIDGE = "vmflowbr0"

PROGRAM = """\
vm {name} {{
  image  = tiny
  cpu    = 1 .. 4
  memory = 256MiB .. 256MiB
  health = app("nginx") running
}}
"""

TIMINGS = Timings()
timed = TIMINGS.timed


@pytest.fixture(scope="session")
def qemu():
    """libvirtd and the guest; a bridge for the NIC tests."""
    hv = open_qemu()
    if subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True, check=False).returncode != 0:
        subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
    subprocess.run(["ip", "link", "set", BRIDGE, "up"], check=True)
    yield hv
    hv.close()
    TIMINGS.report("QEMU integration timings")


class World(InGuest):
    """The program folder, its state folder and the one VM the tests share."""

    def __init__(self, hv) -> None:
        self.work = make_work("vmflow-it-")
        self.prog = self.work / "prog"
        (self.prog / "images").mkdir(parents=True)
        self.state = self.work / "state"
        self.name = f"vmflow-it-{os.getpid()}"
        self.hv = hv
        images = {"tiny": CMDLINE + " vmflow.app=1",
                  "tiny-b": CMDLINE + " vmflow.app=1 vmflow.image=b",
                  "tiny-broken": CMDLINE + " vmflow.image=broken"}  # no app: its health check fails
        for image_id, cmdline in images.items():
            (self.prog / "images" / f"{image_id}.yaml").write_text(IMAGE.format(id=image_id, cmdline=cmdline))
        (self.prog / "main.flow").write_text(PROGRAM.format(name=self.name))

    def edit(self, old: str, new: str) -> None:
        f = self.prog / "main.flow"
        text = f.read_text()
        assert old in text, old
        f.write_text(text.replace(old, new, 1))

    def apply(self, hv=None, expect: str = "applied"):
        """Plan and apply through the library, as `vmflow apply --libvirt qemu:///system --image-root` does."""
        from controller.apply import Applier
        from controller.context import image_repo, load, make_plan, open_store

        hv = hv or self.hv
        t = load(self.prog, URI, self.state, image_root=GUEST_DIR)
        assert t.compilation.ok, [d.message for d in t.compilation.diagnostics]
        plan, _ = make_plan(t, hv)
        store = open_store(t)
        try:
            result = Applier(hv, store, images=image_repo(t, hv), health=t.health,
                             health_timeout=8).apply(plan, t.program)
        finally:
            store.close()
        assert [o.result for o in result.outcomes] == [expect], [(o.result, o.detail) for o in result.outcomes]
        return plan, result

    # -- inside the guest
    def nginx(self) -> bool:
        return self.sh("pidof nginx")[0] == 0

    def cmdline(self) -> str:
        return self.out("cat /proc/cmdline")

    def vm_sizes(self) -> tuple[int, int]:
        vm = self.hv.observe(snapshots=False).vms[self.name]
        return vm.vcpus, vm.memory_kib

    def uuid_and_macs(self) -> tuple[str, list[str]]:
        vm = self.hv.observe(snapshots=False).vms[self.name]
        return vm.uuid, [n.mac for n in vm.nics]


@pytest.fixture(scope="module")
def world(qemu):
    w = World(qemu)
    yield w
    log = w.state / "logs" / f"{w.name}.serial.log"
    if log.exists() and os.environ.get("VMFLOW_KEEP_LOGS"):
        print(log.read_text(errors="replace")[-3000:])
    discard(qemu, w.name, w.work)


def test_create_boots_the_image_with_its_app(world):
    with timed("create (overlay, define, boot, health app(nginx))"):
        plan, _ = world.apply()
    assert [c.action.value for c in plan.actionable] == ["create"]
    assert world.nginx()
    assert "vmflow.app=1" in world.cmdline()
    assert world.online_cpus() == 1
    vm = world.hv.observe().vms[world.name]
    assert vm.image == "tiny" and vm.running and vm.max_vcpus == 4
    assert str(world.state / "disks" / world.name / "boot-tiny-") in world.hv.xml(world.name)
    with timed("health checks: agent, port(80), port(81) refused, app(nope) absent"):
        assert world.hv.health(world.name, "agent") is None
        assert world.hv.health(world.name, "port", 80) is None
        assert "port 81" in world.hv.health(world.name, "port", 81, check_timeout=1)
        assert "nope" in world.hv.health(world.name, "app", "nope", check_timeout=1)
    # A second plan is empty: what was applied is what is observed.
    from controller.context import load, make_plan

    t = load(world.prog, URI, world.state, image_root=GUEST_DIR)
    assert not make_plan(t, world.hv)[0].actionable


def test_cpu_add_is_online_in_the_guest(world):
    world.edit("cpu    = 1 .. 4", "cpu    = 2 .. 4")
    with timed("cpu 1 -> 2 (snapshot, hotplug, verify)"):
        plan, _ = world.apply()
    assert plan.actionable[0].action.value == "update-live"
    with timed("cpu: second vCPU online in the guest"):
        world.until(lambda: world.online_cpus() == 2, 30, "2 CPUs online")
    assert world.out("cat /sys/devices/system/cpu/online") in ("0-1", "0,1")


def test_memory_resize_is_seen_in_meminfo(world):
    before = world.memtotal()
    world.edit("memory = 256MiB .. 256MiB", "memory = 192MiB .. 256MiB")
    with timed("memory 256 -> 192 MiB (balloon)"):
        plan, _ = world.apply()
    assert plan.actionable[0].action.value == "update-live"
    with timed("memory: MemTotal follows in the guest"):
        world.until(lambda: world.memtotal() <= before - 60 * 1024, 30, "MemTotal shrinks by 64 MiB")


def test_disk_attach_is_seen_by_serial(world):
    world.edit('  health = app("nginx") running\n', '  health = app("nginx") running\n\n'
               '  disk scratch {\n    size = 16MiB\n  }\n')
    with timed("disk attach (qcow2 file, hotplug)"):
        plan, _ = world.apply()
    assert plan.actionable[0].action.value == "update-live"

    def device():
        return world.out("for b in /sys/block/*; do [ -e $b/serial ] && [ \"$(cat $b/serial)\" = scratch ] "
                         "&& echo ${b##*/}; done; true")
    with timed("disk: visible in the guest"):
        dev = world.until(device, 30, "a block device with serial scratch")
    assert int(world.out(f"cat /sys/block/{dev}/size")) * 512 == 16 * 1024 * 1024


def test_nic_attach_is_seen_in_sys_class_net(world):
    world.edit('  disk scratch {', f'  nic lan {{\n    bridge = "{BRIDGE}"\n  }}\n\n  disk scratch {{')
    with timed("nic attach (hotplug on a bridge)"):
        plan, _ = world.apply()
    assert plan.actionable[0].action.value == "update-live"
    _, macs = world.uuid_and_macs()
    assert len(macs) == 1 and macs[0]

    def macs_in_guest():
        return world.out("cat /sys/class/net/*/address").split()
    with timed("nic: visible in the guest"):
        world.until(lambda: macs[0] in macs_in_guest(), 30, f"an interface with MAC {macs[0]}")


def test_os_swap_keeps_uuid_mac_and_data_disk(world):
    uuid, macs = world.uuid_and_macs()
    world.edit("image  = tiny\n", "image  = tiny-b\n")
    with timed("OS swap (shutdown, new overlay, define, boot, health)"):
        plan, _ = world.apply()
    assert plan.actionable[0].action.value == "update-restart"
    assert "vmflow.image=b" in world.cmdline()
    assert world.nginx()
    assert world.uuid_and_macs() == (uuid, macs)
    assert world.online_cpus() == 2
    assert "scratch" in world.out("cat /sys/block/*/serial")
    assert world.hv.observe().vms[world.name].image == "tiny-b"


def test_unhealthy_swap_is_rolled_back(world):
    uuid, macs = world.uuid_and_macs()
    world.edit("image  = tiny-b\n", "image  = tiny-broken\n")
    with timed("OS swap to an image failing app(nginx), rolled back"):
        _, result = world.apply(expect="rolled-back")
    assert "nginx" in result.outcomes[0].detail
    with timed("rollback: agent answers again"):
        world.until(lambda: world.hv.agent_ping(world.name), 60, "agent after revert")
    assert world.nginx()
    assert "vmflow.image=b" in world.cmdline()
    vm = world.hv.observe().vms[world.name]
    assert vm.image == "tiny-b" and (vm.uuid, [n.mac for n in vm.nics]) == (uuid, macs)
    # The overlay made for the failed swap went with the rollback: every disk file is one the domain or
    # one of its snapshots names.
    files = {str(f) for f in (world.state / "disks" / world.name).glob("*.qcow2")}
    assert not [f for f in files if "/boot-tiny-broken-" in f], files
    assert files <= world.hv.disk_files(world.name), files
    world.edit("image  = tiny-broken\n", "image  = tiny-b\n")


def test_rollback_after_vcpu_hotplug(world):
    """The snapshot is taken before the hotplug; a failure after it still restores the VM as it was."""
    from controller.hypervisor import Hypervisor, HypervisorError

    class FailMemory(Hypervisor):
        def set_memory(self, *a, **kw):
            raise HypervisorError("set memory", "injected failure")

    world.edit("cpu    = 2 .. 4", "cpu    = 3 .. 4")
    world.edit("memory = 192MiB .. 256MiB", "memory = 160MiB .. 256MiB")
    with FailMemory(URI) as hv, timed("vCPU 2 -> 3 then a failure: rolled back"):
        _, result = world.apply(hv, expect="rolled-back")
    assert "injected failure" in result.outcomes[0].detail
    with timed("rollback after hotplug: agent answers again"):
        world.until(lambda: world.hv.agent_ping(world.name), 60, "agent after revert")
    assert world.online_cpus() == 2
    assert world.nginx()
    # The live XML reports the balloon as the guest reports it: it settles within seconds.
    world.until(lambda: world.vm_sizes() == (2, 192 * 1024), 20, "2 vCPUs and 192 MiB in the live XML")


def test_rollback_to_a_snapshot_taken_after_a_vcpu_hotplug(world):
    """A snapshot taken after a live vCPU hotplug cannot be loaded again; the rollback still restores the
    VM (config and disks from the snapshot, booted afresh)."""
    from controller.hypervisor import Hypervisor, HypervisorError

    class FailMemory(Hypervisor):
        def set_memory(self, *a, **kw):
            raise HypervisorError("set memory", "injected failure")

    world.edit("memory = 160MiB .. 256MiB", "memory = 192MiB .. 256MiB")
    with timed("cpu 2 -> 3 (hotplug)"):
        world.apply()
    world.until(lambda: world.online_cpus() == 3, 30, "3 CPUs online")
    world.edit("memory = 192MiB .. 256MiB", "memory = 160MiB .. 256MiB")
    with FailMemory(URI) as hv, timed("a failure after a snapshot taken after a hotplug: rolled back"):
        _, result = world.apply(hv, expect="rolled-back")
    print("\n  rollback:", result.outcomes[0].detail)
    with timed("rollback: agent answers again"):
        world.until(lambda: world.hv.agent_ping(world.name), 60, "agent after revert")
    world.until(lambda: world.online_cpus() == 3, 30, "3 CPUs online after the rollback")
    assert world.nginx()
    assert world.hv.observe().vms[world.name].image == "tiny-b"
    world.until(lambda: world.vm_sizes() == (3, 192 * 1024), 20, "3 vCPUs and 192 MiB in the live XML")


def test_cli_plan_sees_no_changes(world):
    """The CLI with --libvirt and --image-root agrees with the library: nothing left to do."""
    world.edit("memory = 160MiB .. 256MiB", "memory = 192MiB .. 256MiB")
    with timed("vmflow plan (CLI, qemu:///system)"):
        r = subprocess.run([sys.executable, "-m", "controller.cli", "plan", str(world.prog), "--libvirt", URI,
                            "--image-root", str(GUEST_DIR), "--state-dir", str(world.state)],
                           capture_output=True, text=True, env=dict(os.environ, NO_COLOR="1"), timeout=60,
                           check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_disk_and_nic_detach_are_seen_in_the_guest(world):
    _, macs = world.uuid_and_macs()
    world.edit(f'  nic lan {{\n    bridge = "{BRIDGE}"\n  }}\n\n', "")
    world.edit("  disk scratch {\n    size = 16MiB\n  }\n", "")
    with timed("disk + nic detach (until gone from the live XML)"):
        plan, _ = world.apply()
    assert plan.actionable[0].action.value == "update-live"
    assert "scratch" not in world.out("cat /sys/block/*/serial 2>/dev/null; true").split()
    assert macs[0] not in world.out("cat /sys/class/net/*/address").split()
    vm = world.hv.observe().vms[world.name]
    assert (vm.disks, vm.nics) == ((), ())


def test_failed_create_leaves_no_vm_and_no_disk_file(world):
    """A new VM whose health check fails is removed, with the boot overlay and data disk made for it."""
    new = f"{world.name}-new"
    block = (f'\nvm {new} {{\n  image  = tiny-broken\n  cpu    = 1\n  memory = 128MiB\n'
             f'  health = app("nginx") running\n\n  disk extra {{\n    size = 8MiB\n  }}\n}}\n')
    f = world.prog / "main.flow"
    f.write_text(f.read_text() + block)
    try:
        with timed("create failing app(nginx), removed"):
            _, result = world.apply(expect="rolled-back")
        assert "the new VM was removed" in result.outcomes[0].detail
        assert not world.hv.exists(new)
        assert not (world.state / "disks" / new).exists()
    finally:
        f.write_text(f.read_text().replace(block, ""))
        if world.hv.exists(new):
            world.hv.stop(new)
            world.hv.undefine(new)
