"""Run-time morphs on a real QEMU (`qemu:///system`, TCG) with the tiny guest, driven by real load.

One VM with four morph rules, and the morph loop (controller/runtime.py) stepped in real time every 5 s with
the real monitor (libvirt's bulk statistics, the guest agent for `app(...)`): memory pressure made in the
guest fires `memory += 128MiB` and the guest's MemTotal grows; a morph after which the VM's health check
fails inside the stability window is rolled back to its snapshot; an OS swap runs in a worker while the VM
is busy and boots the new image with the same UUID; a busy loop crosses `cpu > 80% for 30s` and the vCPU
the morph adds comes online in the guest. After each applied morph the program's plan is a no-op with the
reason `morphed`. Each test builds on the previous one (a TCG guest costs seconds to boot).

Needs libvirtd and the guest (scripts/setup-libvirt.sh, scripts/build-guest.sh /var/lib/vmflow-guest; `make
test` runs both as root). Without them the tests are skipped, and under `CI=true` they fail.
"""

from __future__ import annotations

import os
import time

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

INTERVAL = 5.0  # seconds between rounds of the morph loop
STABILITY = 10.0  # seconds a morphed VM must stay healthy

PROGRAM = """\
vm {name} {{
  image  = tiny
  cpu    = 1 .. 4
  memory = 192MiB .. 384MiB
  health = app("nginx") running

  morph grow when cpu > 80% for 30s {{
    cpu += 1 max 2
    cooldown 20s
    revert when cpu < 30% for 20s
  }}
  morph more when memory > 70% for 10s {{
    memory += 128MiB
    cooldown 10m
  }}
  morph probe when app("probe") running {{
    memory += 64MiB
    cooldown 10m
  }}
  morph swap when app("swapme") running {{
    swap image tiny-b
    cooldown 10m
  }}
}}
"""

# A process the rules can see by name (`pidof`), started detached so guest-exec returns at once.
START = ("printf '#!/bin/sh\\nwhile :; do sleep 1; done\\n' >/tmp/{name} && chmod +x /tmp/{name} && "
         "setsid /tmp/{name} </dev/null >/dev/null 2>&1 &")
KILL = "for p in $(pidof {name}); do kill $p; done; true"

TIMINGS = Timings()
timed = TIMINGS.timed


@pytest.fixture(scope="module")
def qemu():
    hv = open_qemu()
    yield hv
    hv.close()
    TIMINGS.report("QEMU morph timings")


class World(InGuest):
    """The program, its state folder, the VM, and the morph loop the tests share."""

    def __init__(self, hv) -> None:
        from controller import context
        from controller.runtime import Runtime
        from controller.store import Series, series_path

        self.work = make_work("vmflow-morph-")
        self.prog = self.work / "prog"
        (self.prog / "images").mkdir(parents=True)
        self.state = self.work / "state"
        self.name = f"vmflow-morph-{os.getpid()}"
        self.hv = hv
        for image_id, cmdline in {"tiny": CMDLINE + " vmflow.app=1",
                                  "tiny-b": CMDLINE + " vmflow.app=1 vmflow.image=b"}.items():
            (self.prog / "images" / f"{image_id}.yaml").write_text(IMAGE.format(id=image_id, cmdline=cmdline))
        (self.prog / "main.flow").write_text(PROGRAM.format(name=self.name))
        self.t = context.load(self.prog, URI, self.state, image_root=GUEST_DIR)
        assert self.t.compilation.ok, [d.message for d in self.t.compilation.diagnostics]
        self.store = context.open_store(self.t)
        self.series = Series(series_path(self.state))
        self.images = context.image_repo(self.t, hv)
        self.rt = Runtime(self.t.program, hv, self.store, self.series, interval=INTERVAL, stability=STABILITY,
                          images=self.images, health_timeout=10)
        self.rt.load(self.t.compilation.program)

    def create(self):
        from controller.apply import Applier
        from controller.context import make_plan

        plan, _ = make_plan(self.t, self.hv)
        result = Applier(self.hv, self.store, images=self.images, health=self.t.health,
                         health_timeout=10).apply(plan, self.t.program)
        assert [o.result for o in result.outcomes] == ["applied"], [(o.result, o.detail) for o in result.outcomes]

    def plan_change(self):
        from controller.context import make_plan

        (change,) = make_plan(self.t, self.hv)[0].changes
        return change

    def drive(self, done, timeout: float, what: str) -> list:
        """Rounds of the morph loop every INTERVAL seconds, sampling for real, until `done(outcomes)`."""
        got: list = []
        deadline = time.monotonic() + timeout
        while True:
            t = time.time()
            got += self.rt.step(t)
            if done(got):
                return got
            assert time.monotonic() < deadline, f"{what}: not reached in {timeout} s: " + \
                ", ".join(f"{o.morph} {o.outcome}" for o in got)
            time.sleep(max(0.0, t + INTERVAL - time.time()))

    def observed(self):
        return self.hv.observe_vm(self.name)


@pytest.fixture(scope="module")
def world(qemu):
    w = World(qemu)
    yield w
    w.rt.close(60)
    if discard(qemu, w.name, w.work):
        w.series.close()
        w.store.close()


_ENDS = ("applied", "reverted", "rolled-back", "failed")


def _ended(morph: str):
    return lambda got: any(o.morph == morph and o.outcome in _ENDS for o in got)


def _one(got: list, morph: str):
    (o,) = [o for o in got if o.morph == morph and o.outcome in _ENDS]
    return o


def test_create_the_vm(world):
    with timed("create (overlay, define, boot, health app(nginx))"):
        world.create()
    assert world.sh("pidof nginx")[0] == 0


def test_memory_pressure_grows_the_balloon_and_memtotal(world):
    from controller.plan import Action, Reason

    before = world.memtotal()
    # 80 MiB in a tmpfs of a guest with ~150 MiB: memory in use (MemTotal - MemAvailable) goes past 70%.
    world.out("mkdir -p /mnt/fill && mount -t tmpfs -o size=95% tmpfs /mnt/fill && "
              "dd if=/dev/zero of=/mnt/fill/f bs=1M count=80 2>/dev/null")
    with timed("memory > 70% for 10s: fired and applied (real samples, balloon, 10 s stability)"):
        got = world.drive(_ended("more"), 90, "the memory morph")
    o = _one(got, "more")
    assert o.outcome == "applied", o.detail
    assert [x.outcome for x in got if x.morph == "more"] == ["fired", "applied"]
    assert o.reason.startswith("memory ") and o.reason.endswith("> 70% for 10s: memory 192MiB → 320MiB")
    assert o.after.memory_kib == 320 * 1024 and o.after.owner.morphs == ("memory:more",)
    with timed("memory: MemTotal follows in the guest"):
        world.until(lambda: world.memtotal() >= before + 100 * 1024, 30, "MemTotal grows by 128 MiB")
    world.out("rm -f /mnt/fill/f && umount /mnt/fill")
    change = world.plan_change()
    assert (change.action, change.reasons) == (Action.NOOP, (Reason.MORPHED,))
    events = world.store.events(program=world.t.program, kind="morph", limit=2)
    assert [(e.outcome, e.vm) for e in events] == [("applied", world.name), ("fired", world.name)]


def test_a_morph_the_vm_does_not_survive_is_rolled_back(world):
    """`memory += 64MiB` applies and verifies, then the application the health check watches dies inside
    the stability window: the VM goes back to its snapshot, application running, memory as it was."""
    world.out(START.format(name="probe"))

    killed = []

    def sleep_then_break(seconds: float) -> None:
        if not killed:
            killed.append(world.sh("appctl stop"))
        time.sleep(seconds)

    world.rt.sleep = sleep_then_break
    try:
        with timed("app(probe) fires memory += 64MiB; nginx killed in the stability window: rolled back"):
            got = world.drive(_ended("probe"), 60, "the probe morph")
    finally:
        world.rt.sleep = time.sleep
    o = _one(got, "probe")
    assert killed, "the stability window never started"
    assert o.outcome == "rolled-back", (o.outcome, o.detail)
    assert "became unhealthy" in o.detail and "nginx" in o.detail and "reverted to snapshot vmflow-" in o.detail
    ev = world.store.events(program=world.t.program, kind="morph", limit=1)[0]
    assert ev.outcome == "rolled-back" and ev.data["detail"] == o.detail
    with timed("rollback: agent and nginx back"):
        world.until(lambda: world.hv.agent_ping(world.name), 60, "agent after revert")
        world.until(lambda: world.sh("pidof nginx")[0] == 0, 20, "nginx after revert")
    vm = world.observed()
    assert vm.owner.morphs == ("memory:more",)
    world.until(lambda: world.observed().memory_kib == 320 * 1024, 20, "320 MiB in the live XML")
    world.out(KILL.format(name="probe"))  # the snapshot had it running


def test_an_os_swap_morph_runs_in_a_worker_and_keeps_the_uuid(world):
    from controller.plan import Action, Reason

    uuid = world.observed().uuid
    world.out(START.format(name="swapme"))
    seen_busy = []

    def done(got):
        seen_busy.append(world.rt.busy())
        return _ended("swap")(got)

    with timed("app(swapme) fires swap image: worker (shutdown, overlay, boot, health, 10 s stability)"):
        got = world.drive(done, 120, "the OS swap morph")
    o = _one(got, "swap")
    assert o.outcome == "applied", o.detail
    assert {world.name} in seen_busy  # the VM was busy while the worker changed it
    assert "vmflow.image=b" in world.out("cat /proc/cmdline")
    assert world.sh("pidof nginx")[0] == 0
    vm = world.observed()
    assert vm.uuid == uuid and vm.image == "tiny-b" and vm.owner.base["image"] == "tiny"
    assert set(vm.owner.morphs) == {"memory:more", "image:swap"} and vm.memory_kib == 320 * 1024
    change = world.plan_change()
    assert (change.action, change.reasons) == (Action.NOOP, (Reason.MORPHED,))


def test_cpu_load_adds_a_vcpu_that_comes_online_in_the_guest(world):
    from controller.plan import Action, Reason

    assert world.online_cpus() == 1
    # A script of its own name, so that `pidof burn` finds it: the guest's busybox has no pkill.
    world.out("printf '#!/bin/sh\\nwhile :; do :; done\\n' >/tmp/burn && chmod +x /tmp/burn && "
              "setsid /tmp/burn </dev/null >/dev/null 2>&1 &")
    try:
        with timed("cpu > 80% for 30s under a busy loop: fired and applied (hotplug, 10 s stability)"):
            got = world.drive(_ended("grow"), 240, "the cpu morph")
    finally:
        world.out(KILL.format(name="burn"))
        world.until(lambda: world.sh("pidof burn")[0] != 0, 10, "the busy loop gone")
    o = _one(got, "grow")
    assert o.outcome == "applied", o.detail
    assert o.reason.startswith("cpu ") and o.reason.endswith("> 80% for 30s: cpu 1 → 2")
    with timed("cpu: the second vCPU online in the guest"):
        world.until(lambda: world.online_cpus() == 2, 30, "2 CPUs online")
    assert world.out("cat /sys/devices/system/cpu/online") in ("0-1", "0,1")
    vm = world.observed()
    assert vm.vcpus == 2 and set(vm.owner.morphs) == {"memory:more", "image:swap", "cpu:grow"}
    change = world.plan_change()
    assert (change.action, change.reasons) == (Action.NOOP, (Reason.MORPHED,))


def test_when_the_load_is_gone_the_cpu_morph_reverts_with_a_restart(world):
    """QEMU cannot unplug a vCPU from a running guest, so scaling back restarts the VM with one vCPU in its
    config (`cpu-unplug`); the other morphs stay."""
    with timed("cpu < 30% for 20s after the load: reverted (restart with 1 vCPU, 10 s stability)"):
        got = world.drive(_ended("grow"), 240, "the cpu revert")
    o = _one(got, "grow")
    assert o.outcome == "reverted", o.detail
    assert o.reason.startswith("revert: cpu ") and o.reason.endswith("< 30% for 20s: cpu 2 → 1")
    world.until(lambda: world.hv.agent_ping(world.name), 60, "agent after the restart")
    world.until(lambda: world.online_cpus() == 1, 30, "1 CPU online")
    vm = world.observed()
    assert vm.vcpus == 1 and set(vm.owner.morphs) == {"memory:more", "image:swap"}
