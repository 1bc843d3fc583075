"""The run-time morph loop (controller/runtime.py) on libvirt's test driver, with samples written into the
time-series store rather than real load.

A rule fires through the Series, the change goes through the real planner and Applier (snapshot, change,
verify, stability window), events are recorded, and the reconciler's next plan of the same revision calls
the VM `morphed`. Faults are injected at vmflow's own adapter (a Hypervisor whose `set_vcpus` raises, or
whose health check fails inside the stability window). The last tests run the real `vmflow controller`,
whose test-driver VMs read as fully busy (the driver's CPU time is the wall clock), and the notify webhook
against a local HTTP server.
"""

from __future__ import annotations

import http.server
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest

from controller import context, embedded
from controller.apply import Applier
from controller.hypervisor import Hypervisor, HypervisorError
from controller.monitor import Sample
from controller.plan import Action, Reason
from controller.rules import Limits
from controller.runtime import MorphOutcome, Runtime, rules_key
from controller.service import Notifier
from controller.store import Series, series_path
from tests.cli_runner import ROOT, vmflow
from tests.gitrepo import Repo

T0 = 1_750_000_000.0  # the rounds' (simulated) times

FLOW = """\
pool rack1 {
  cpu    = 10
  memory = 64GiB
}

vm web {
  image  = linux-base
  pool   = rack1
  cpu    = 2 .. 6
  memory = 2GiB .. 8GiB

  morph grow when cpu > 80% for 30s {
    cpu += 2 max 6
    cooldown 2m
    revert when cpu < 20% for 30s
  }
  morph bigger when memory > 90% for 30s {
    swap image linux-base-large
    cooldown 1h
  }
}

vm api {
  image  = linux-base
  pool   = rack1
  cpu    = 4 .. 4
  memory = 1GiB .. 4GiB
}
"""


class World:
    """A program applied to the embedded default, and what a Runtime needs around it."""

    def __init__(self, root: Path, flow: str = FLOW) -> None:
        self.prog = root / "shop"
        self.prog.mkdir(parents=True)
        (self.prog / "main.flow").write_text(flow)
        self.state = root / "state"
        self.t = context.load(self.prog, None, self.state)
        assert self.t.compilation.ok, [d.message for d in self.t.compilation.diagnostics]
        self.hv = Hypervisor(self.t.uri)
        self.store = context.open_store(self.t)
        self.series = Series(series_path(self.state))
        self.slept: list[float] = []
        result = Applier(self.hv, self.store, saved=self.save).apply(context.make_plan(self.t, self.hv)[0],
                                                                    self.t.program)
        assert result.ok

    def save(self, hv: Hypervisor | None = None) -> None:
        embedded.save(self.state, (hv or self.hv).export())

    def runtime(self, hv: Hypervisor | None = None, **kw) -> Runtime:
        hv = hv or self.hv
        kw.setdefault("stability", 20.0)
        kw.setdefault("sleep", self.slept.append)  # the stability window in simulated time
        kw.setdefault("clock", lambda: T0)
        rt = Runtime(self.t.program, hv, self.store, self.series, interval=10.0, saved=lambda: self.save(hv), **kw)
        rt.load(self.t.compilation.program)
        return rt

    def observed(self, name: str = "web"):
        """The VM as a new process would see it: a fresh connection reads the persisted state."""
        with Hypervisor(embedded.uri(self.state)) as hv:
            return hv.observe(snapshots=True).vms[name]

    def plan_again(self):
        """The reconciler's plan of the same revision, against the persisted state."""
        with Hypervisor(embedded.uri(self.state)) as hv:
            return context.make_plan(self.t, hv)[0]

    def close(self) -> None:
        self.series.close()
        self.store.close()
        self.hv.close()


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.close()


def feed(rt: Runtime, start: float, end: float, **values: float) -> list[MorphOutcome]:
    """Rounds every 10 s from `start` to `end`, each storing one sample per metric for `web`."""
    out: list[MorphOutcome] = []
    t = start
    while t <= end + 1e-9:
        out += rt.step(t, [Sample("web", metric, t, v) for metric, v in values.items()])
        t += 10.0
    return out


def outcomes(events) -> list[str]:
    return [o.outcome for o in events]


def morph_events(w: World) -> list[tuple[str, str]]:
    return [(e.outcome, e.vm) for e in reversed(w.store.events(program="shop", kind="morph"))]


def test_a_rule_fires_through_the_series_and_the_vm_gets_more_vcpus(world):
    rt = world.runtime()
    got = feed(rt, T0, T0 + 20, cpu=95.0)
    # The third sample covers the 30 s window (T0 - 10, T0 + 20]: the rule fires at T0 + 20, not before.
    assert [(o.at, o.outcome) for o in got] == [(T0 + 20, "fired"), (T0 + 20, "applied")]
    fired, applied = got
    assert fired.reason == "cpu 95% > 80% for 30s: cpu 2 → 4" and fired.after is None
    assert (applied.before.vcpus, applied.after.vcpus) == (2, 4)
    assert applied.after.owner.morphs == ("cpu:grow",)
    assert world.slept == [5.0, 5.0, 5.0, 5.0]  # the stability window: a health check every 5 s for 20 s
    vm = world.observed()
    assert vm.vcpus == 4 and vm.owner.morphs == ("cpu:grow",) and vm.owner.base["cpu"] == 2
    assert any(s.startswith("vmflow-") for s in vm.snapshots)  # snapshotted before the change
    assert morph_events(world) == [("fired", "web"), ("applied", "web")]
    e = world.store.events(program="shop", kind="morph", limit=1)[0]
    assert e.at == T0 + 20 and e.data["before"]["vcpus"] == 2 and e.data["after"]["vcpus"] == 4
    assert e.message.startswith("grow: cpu 95% > 80% for 30s: cpu 2 → 4 (applied in ")
    # The morph applied is what the reconciler accepts: the same revision plans nothing, with a reason.
    (change,) = [c for c in world.plan_again().changes if c.address == "vm.web"]
    assert (change.action, change.reasons) == (Action.NOOP, (Reason.MORPHED,))
    # The engine's state went to the store after the round.
    assert world.store.get_doc(rules_key("shop"))["rules"]["web"]["grow"]["last"] == T0 + 20
    # The VM's history records the morph's apply, revision kept.
    assert world.store.history("shop", 1)[0].summary["morph"] == {"vm": "web", "name": "grow", "intent": "fire"}


def test_a_revert_rule_scales_back_to_the_base(world):
    rt = world.runtime()
    assert "applied" in outcomes(feed(rt, T0, T0 + 20, cpu=95.0))
    # Low load from then on: the revert is due 30 s later (reported), and waits for the 2-minute cooldown.
    got = feed(rt, T0 + 30, T0 + 200, cpu=5.0)
    assert [(o.at, o.outcome) for o in got] == [(T0 + 50, "skipped-cooldown"), (T0 + 140, "reverted")]
    assert got[1].reason == "revert: cpu 5% < 20% for 30s: cpu 4 → 2"
    vm = world.observed()
    assert vm.vcpus == 2 and vm.owner.morphs == ()
    assert morph_events(world)[-1] == ("reverted", "web")
    (change,) = [c for c in world.plan_again().changes if c.address == "vm.web"]
    assert (change.action, change.reasons) == (Action.NOOP, ())


def test_a_pool_without_room_skips_the_morph_and_says_what_is_missing(tmp_path):
    w = World(tmp_path, FLOW.replace("cpu    = 10", "cpu    = 7"))
    try:
        rt = w.runtime()
        got = feed(rt, T0, T0 + 40, cpu=95.0)
        assert outcomes(got) == ["skipped-capacity"]  # reported once for the episode
        assert "pool rack1 is short: 8 vCPUs needed, 7 in the pool (1 missing)" in got[0].reason
        assert got[0].after is None and got[0].before.vcpus == 2
        vm = w.observed()
        assert vm.vcpus == 2 and vm.owner.morphs == () and not vm.snapshots
        assert morph_events(w) == [("skipped-capacity", "web")]
    finally:
        w.close()


class FailingVcpus(Hypervisor):
    def set_vcpus(self, name: str, count: int, live: bool) -> None:
        raise HypervisorError("set vcpus", "injected failure")


def test_a_failed_change_is_rolled_back_to_its_snapshot(world):
    with FailingVcpus(world.t.uri) as hv:
        rt = world.runtime(hv)
        got = feed(rt, T0, T0 + 20, cpu=95.0)
    assert outcomes(got) == ["fired", "rolled-back"]
    assert "injected failure" in got[1].detail and "reverted to snapshot vmflow-" in got[1].detail
    assert got[1].after.vcpus == 2 and got[1].after.owner.morphs == ()
    vm = world.observed()
    assert vm.vcpus == 2 and vm.owner.morphs == ()
    assert morph_events(world) == [("fired", "web"), ("rolled-back", "web")]
    (change,) = [c for c in world.plan_again().changes if c.address == "vm.web"]
    assert change.action is Action.NOOP


class SickLater(Hypervisor):
    """Healthy at the verification right after the change, sick at the checks of the stability window."""

    def health(self, name, kind, arg=None, boot_timeout: float = 90.0, check_timeout: float = 20.0):
        if check_timeout == 0:
            return 'application `nginx` is not running'
        return super().health(name, kind, arg, boot_timeout, check_timeout)


def test_a_vm_that_turns_unhealthy_within_the_stability_window_is_rolled_back(world):
    with SickLater(world.t.uri) as hv:
        rt = world.runtime(hv)
        got = feed(rt, T0, T0 + 20, cpu=95.0)
    assert outcomes(got) == ["fired", "rolled-back"]
    assert "became unhealthy 5s after the change: application `nginx` is not running" in got[1].detail
    assert world.slept == [5.0]
    assert world.observed().vcpus == 2
    ev = world.store.events(program="shop", kind="morph", limit=1)[0]
    assert ev.outcome == "rolled-back" and "nginx" in ev.message


def test_cooldown_and_rate_survive_a_restart_of_the_runtime(world):
    rt = world.runtime()
    assert "applied" in outcomes(feed(rt, T0, T0 + 20, cpu=95.0))  # 2 → 4 at T0 + 20
    # A new Runtime (a controller restart) restores the engine from the store: still in the cooldown.
    rt2 = world.runtime()
    assert rt2.engine.state() == rt.engine.state()
    assert outcomes(feed(rt2, T0 + 30, T0 + 130, cpu=95.0)) == []
    got = feed(rt2, T0 + 140, T0 + 140, cpu=95.0)  # 2 minutes after the fire: 4 → 6
    assert outcomes(got) == ["fired", "applied"] and got[1].after.vcpus == 6
    # A Runtime without the saved state would have fired at once.
    world.store.put_doc(rules_key("shop"), {"version": 1, "rules": {}, "actions": {}})
    fresh = world.runtime()
    assert outcomes(feed(fresh, T0 + 150, T0 + 150, cpu=95.0)) == ["skipped-bound"]  # at 6, its max


def test_an_os_swap_runs_in_a_worker_and_pauses_the_vms_rules(world):
    release = threading.Event()
    rt = world.runtime(sleep=lambda s: release.wait(10))
    got = feed(rt, T0, T0 + 20, memory=95.0)
    assert outcomes(got) == ["fired"]  # the swap restarts the VM: it runs in a worker
    assert got[0].reason == "memory 95% > 90% for 30s: image linux-base → linux-base-large"
    assert rt.busy() == {"web"} and rt.in_flight() == 1
    # While it runs, the VM's other rules wait: `paused`, reported once.
    got = feed(rt, T0 + 30, T0 + 60, memory=95.0, cpu=95.0)
    assert outcomes(got) == ["paused"] and got[0].morph == "grow"
    assert "the VM is being changed" in got[0].reason
    release.set()
    assert rt.wait(10)
    assert rt.busy() == set()
    got = feed(rt, T0 + 70, T0 + 70, memory=95.0, cpu=95.0)
    # The swap's outcome comes with the next round, and the paused rule resumes at once.
    assert outcomes(got) == ["applied", "fired", "applied"]
    assert got[0].morph == "bigger" and got[0].after.image == "linux-base-large"
    assert got[2].morph == "grow" and got[2].after.vcpus == 4
    vm = world.observed()
    assert vm.image == "linux-base-large" and vm.vcpus == 4
    assert set(vm.owner.morphs) == {"image:bigger", "cpu:grow"} and vm.owner.base["image"] == "linux-base"
    (change,) = [c for c in world.plan_again().changes if c.address == "vm.web"]
    assert (change.action, change.reasons) == (Action.NOOP, (Reason.MORPHED,))


def test_an_apply_running_elsewhere_pauses_the_rules(world):
    rt = world.runtime()
    world.store.acquire("shop", "vmflow apply", "apply (another process)")
    try:
        # The lock is this process's here; the Runtime holds no lease, so it is someone else's apply.
        got = feed(rt, T0, T0 + 20, cpu=95.0)
    finally:
        world.store.release("shop")
    assert outcomes(got) == ["paused"]
    assert outcomes(feed(rt, T0 + 30, T0 + 30, cpu=95.0)) == ["fired", "applied"]


def test_a_suspended_program_is_sampled_but_not_morphed(world):
    rt = world.runtime()
    rt.suspended = True
    assert feed(rt, T0, T0 + 40, cpu=95.0) == []
    assert world.observed().vcpus == 2 and morph_events(world) == []
    rt.suspended = False  # resumed: the samples taken meanwhile cover the window at once
    assert outcomes(feed(rt, T0 + 50, T0 + 50, cpu=95.0)) == ["fired", "applied"]


def test_fleet_concurrency_holds_the_second_vm(tmp_path):
    flow = FLOW.replace("cpu    = 4 .. 4", "cpu    = 2 .. 4").replace(
        "  memory = 1GiB .. 4GiB\n}", "  memory = 1GiB .. 4GiB\n\n  morph grow when cpu > 80% for 30s {\n"
        "    cpu += 2 max 4\n    cooldown 2m\n  }\n}")
    w = World(tmp_path, flow)
    try:
        rt = w.runtime(limits=Limits(fleet_concurrency=1))
        got: list[MorphOutcome] = []
        for k in range(4):
            t = T0 + 10 * k
            got += rt.step(t, [Sample(vm, "cpu", t, 95.0) for vm in ("web", "api")])
        assert [(o.vm, o.outcome) for o in got] == [("api", "fired"), ("api", "applied"),
                                                    ("web", "skipped-concurrency"), ("web", "fired"),
                                                    ("web", "applied")]
    finally:
        w.close()


def test_skips_can_be_left_out_of_the_events(tmp_path):
    w = World(tmp_path, FLOW.replace("cpu    = 10", "cpu    = 7"))
    try:
        rt = w.runtime(record_skips=False)
        assert outcomes(feed(rt, T0, T0 + 40, cpu=95.0)) == ["skipped-capacity"]
        assert morph_events(w) == []
    finally:
        w.close()


def test_the_reconciler_leaves_a_morphed_vm_alone(tmp_path):
    """The controller's way: the Reconciler applies the revision, the Runtime works through the
    Reconciler's connection and saves through it, and the next reconcile of the revision is a no-op."""
    from controller.gitsource import GitSource
    from controller.reconcile import Reconciler
    from controller.store import Store

    repo = Repo(tmp_path / "infra")
    rev = repo.commit({"apps/shop/main.flow": FLOW}, "shop")
    state = tmp_path / "state"
    rec = Reconciler(GitSource(str(repo.path), "main", "apps/shop", cache_dir=state / "git"),
                     Store(state / "vmflow.db"), state)
    series = Series(series_path(state))
    try:
        assert rec.reconcile_once().result == "synced"
        uri = embedded.uri(state)
        comp = rec.source.compile(rec.compiler, rev)
        rt = Runtime("shop", rec.hypervisor(uri), Store(state / "vmflow.db"), series, stability=0,
                     saved=lambda: rec._saved(uri))
        rt.load(comp.program)
        assert "applied" in outcomes(feed(rt, T0, T0 + 20, cpu=95.0))
        out = rec.reconcile_once(trigger="resync")
        assert out.result == "noop", out.message
        web = next(v for v in rec.status()["inventory"] if v["name"] == "web")
        assert web["vcpus"] == 4 and web["morphs"] == ["cpu:grow"] and web["revision"] == rev
        assert rec.status()["sync"] == "Synced"
    finally:
        series.close()
        rec.close()


# ------------------------------------------------------------------------------------------ notify


class _Hook(http.server.BaseHTTPRequestHandler):
    got: ClassVar[list] = []

    def do_POST(self):  # http.server's name for it
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).got.append((self.headers["Content-Type"], json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_a):
        pass


@pytest.fixture
def hook():
    _Hook.got = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", _Hook.got
    server.shutdown()


def test_the_notify_webhook_gets_failed_and_rolled_back_morphs_and_reconcile_failures(world, hook):
    url, got = hook
    n = Notifier(url, "shop")
    with FailingVcpus(world.t.uri) as hv:
        rt = world.runtime(hv, notify=n.morph)
        assert outcomes(feed(rt, T0, T0 + 20, cpu=95.0)) == ["fired", "rolled-back"]
    n.reconcile("stalled", "abc123", "revision abc123 does not compile")
    n.close(10)
    assert n.sent == 2 and n.failed == 0
    (ctype, morph), (_, rec) = got
    assert ctype == "application/json"
    assert morph["program"] == "shop" and morph["kind"] == "morph" and morph["vm"] == "web"
    assert morph["morph"] == "grow" and morph["outcome"] == "rolled-back" and "injected failure" in morph["detail"]
    assert morph["before"]["vcpus"] == 2 and morph["at"] == T0 + 20
    assert rec == {"program": "shop", "kind": "reconcile", "outcome": "stalled", "revision": "abc123",
                   "message": "revision abc123 does not compile", "at": rec["at"]}


def test_a_webhook_that_fails_is_logged_and_never_raised(caplog):
    n = Notifier("http://127.0.0.1:9/nothing-listens", "shop", timeout=2)
    n.post({"kind": "reconcile", "outcome": "failed"})
    n.close(10)
    assert (n.sent, n.failed) == (0, 1)
    assert any("notify http://127.0.0.1:9/nothing-listens failed" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------ the controller

GROWING = """\
vm web {
  image  = linux-base
  cpu    = 1 .. 4
  memory = 1GiB .. 2GiB

  morph grow when cpu > 80% for 2s {
    cpu += 1
    cooldown 5s
  }
}
"""


def test_the_controller_samples_and_morphs_between_reconciles(tmp_path, hook):
    """A real `vmflow controller` on the embedded default: the test driver's single vCPU reads 100% busy,
    so the rule fires within seconds of the first reconcile; at 2 vCPUs it reads 50% and stops."""
    url, got = hook
    repo = Repo(tmp_path / "infra")
    repo.commit({"apps/shop/main.flow": GROWING}, "shop")
    state = tmp_path / "state"
    proc = subprocess.Popen([sys.executable, "-m", "controller.cli", "controller", "--repo", str(repo.path),
                             "--path", "apps/shop", "--state-dir", str(state), "--listen", "off",
                             "--monitor-interval", "0.5", "--stability", "0.5", "--notify-url", url],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        events: list = []
        while time.monotonic() < deadline:
            r = vmflow("status", "--format", "json", "--state-dir", str(state))
            if r.returncode == 0:
                events = json.loads(r.stdout)["events"].get("shop", [])
                if any(e["kind"] == "morph" and e["outcome"] == "applied" for e in events):
                    break
            time.sleep(0.5)
        kinds = [(e["kind"], e["outcome"]) for e in reversed(events)]
        assert ("morph", "fired") in kinds and ("morph", "applied") in kinds, kinds
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "morph rules loaded" in out
    with Hypervisor(embedded.uri(state)) as hv:
        vm = hv.observe(snapshots=False).vms["web"]
    assert vm.vcpus == 2 and vm.owner.morphs == ("cpu:grow",)
    r = vmflow("status", "--state-dir", str(state))
    assert "morph/applied web: grow: cpu 100" in r.stdout
    assert got == []  # nothing failed: nothing was posted


def test_a_stalled_reconcile_is_posted_to_the_webhook(tmp_path, hook):
    url, got = hook
    repo = Repo(tmp_path / "infra")
    rev = repo.commit({"apps/shop/main.flow": GROWING.replace("cpu    = 1 .. 4", "cpu    = = 4")}, "broken")
    r = vmflow("controller", "--repo", str(repo.path), "--path", "apps/shop", "--state-dir", str(tmp_path / "state"),
               "--once", "--notify-url", url)
    assert r.returncode == 1, r.stdout + r.stderr
    ((_ctype, doc),) = got
    assert doc["program"] == "shop" and doc["kind"] == "reconcile" and doc["outcome"] == "stalled"
    assert doc["revision"] == rev and "does not compile" in doc["message"]
