"""Kill tests: `kill -9` a `vmflow apply` at every gap between the steps it takes, then check that the next
`vmflow apply` recovers to a consistent state with no duplicate VMs.

The killed run is a real process (tests/kill_driver.py) applying, with `--prune`, a change that mixes a
restart update (`api`: a new vCPU maximum), a create (`cache`), a live update (`web`: more vCPUs, and an
old vmflow snapshot to prune) and a delete (`old`, no longer declared). The driver counts every mutating
Hypervisor call, every journal intent and outcome, every save of the embedded state and the rename inside
it, and SIGKILLs itself in one gap between two of them. Apply's order within one change is

    [snapshot → save] → intent → libvirt calls → outcome → [delete old snapshots] → save (write, rename)

so the gaps cover: after the intent and before the first libvirt call; between libvirt calls; after the
last call and before the outcome; after the outcome and before the save (the journal says done, the state
file does not have it yet); inside the save, before the rename; after the save and before the next
change. (Apply writes the outcome before it saves, so "saved but no outcome yet" is not a gap it has.)

After each kill, `vmflow apply --prune --auto-approve` and `vmflow plan --prune` run in the program folder,
and the test checks: the apply exits 0, the plan says "No changes", every VM exists exactly once with the
desired sizes and its original UUID, no other domain appeared, no journal intent is left open, the lock is
released, and a `recovered:` line appears exactly when the kill left an intent open, naming that VM and
saying rolled back (create, update) or finished (delete).

The embedded default loses what was not saved. libvirt's test driver keeps its domains in the memory of
the process; `<state-dir>/hypervisor.xml` is the hypervisor's truth between processes, and apply writes
it only through `saved()`: after a snapshot (so that a journal intent never names a snapshot the state file
lacks) and after each change is settled. A kill between a libvirt call and the next save loses the call:
for the next run it is as if the call never happened, while the journal may still hold the intent (or even
the outcome) of the change. Recovery must
be consistent with that too, so each test also checks that the killed run's state file holds exactly the
changes whose save completed.


Run: `.venv/bin/pytest -q tests/test_kill.py`. Each point is three process starts (about 1.6 s of CPU);
the points run on a pool of threads, so the file takes about half a minute on two idle cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_runner import vmflow

from controller import embedded
from controller.context import load
from controller.hypervisor import Hypervisor
from controller.store import Store

DRIVER = Path(__file__).with_name("kill_driver.py")
PROGRAM = "prog"  # the program is named after its folder, so every copy lives in a folder of this name

BEFORE = """\
vm api {
  image  = linux-base
  cpu    = 1 .. 4
  memory = 1GiB .. 4GiB
}

vm old {
  image  = linux-base
  cpu    = 1
  memory = 1GiB
}

vm web {
  image  = linux-base
  cpu    = 3 .. 8
  memory = 2GiB .. 8GiB
}
"""

AFTER = """\
vm api {
  image  = linux-base
  cpu    = 1 .. 6
  memory = 1GiB .. 4GiB
}

vm cache {
  image  = linux-base
  cpu    = 1
  memory = 1GiB
}

vm web {
  image  = linux-base
  cpu    = 4 .. 8
  memory = 2GiB .. 8GiB
}
"""
# Only vCPUs change on `web`: one live change is enough to put kill points inside a live update.

# What the driver sees an uninterrupted apply do, in order (test_an_uninterrupted_apply_takes_these_steps
# pins it): the kill points are the gaps between these events.
EVENTS = (
    "call snapshot api",
    "save hypervisor.xml",
    "rename hypervisor.xml",
    "intent update-restart vm.api",
    "call stop api",
    "call define api",
    "call start api",
    "settle done vm.api",
    "save hypervisor.xml",
    "rename hypervisor.xml",
    "intent create vm.cache",
    "call define cache",
    "call start cache",
    "settle done vm.cache",
    "save hypervisor.xml",
    "rename hypervisor.xml",
    "call snapshot web",
    "save hypervisor.xml",
    "rename hypervisor.xml",
    "intent update-live vm.web",
    "call set_vcpus web",
    "call set_owner web",
    "settle done vm.web",
    "call delete_snapshot web",
    "save hypervisor.xml",
    "rename hypervisor.xml",
    "intent delete vm.old",
    "call stop old",
    "call undefine old",
    "settle done vm.old",
    "save hypervisor.xml",
    "rename hypervisor.xml",
)

# (vCPUs, vCPU maximum) of each VM in the state file once the first k changes are saved; absent: no domain.
SAVED_AFTER = (
    {"api": (1, 4), "old": (1, 1), "web": (2, 8)},
    {"api": (1, 4), "old": (1, 1), "web": (2, 8)},  # api's snapshot saved before its intent
    {"api": (1, 6), "old": (1, 1), "web": (2, 8)},
    {"api": (1, 6), "cache": (1, 1), "old": (1, 1), "web": (2, 8)},
    {"api": (1, 6), "cache": (1, 1), "old": (1, 1), "web": (2, 8)},  # web's snapshot saved before its intent
    {"api": (1, 6), "cache": (1, 1), "old": (1, 1), "web": (4, 8)},
    {"api": (1, 6), "cache": (1, 1), "web": (4, 8)},
)


@dataclass(frozen=True)
class Point:
    index: int
    spec: str  # kill_driver's KIND:N:WHEN
    id: str
    open_intent: tuple[str, str] | None  # (op, address): the intent written and not settled at the kill
    saved: int  # how many changes reached the state file


def _slug(event: str) -> str:
    return event.replace(" ", "-")


def _points() -> tuple[Point, ...]:
    seen: Counter = Counter()
    numbered = []
    for e in EVENTS:
        kind, _what = e.split(" ", 1)
        seen[kind] += 1
        numbered.append((kind, seen[kind], e))
    points = []
    for i in range(len(numbered) + 1):
        prev = numbered[i - 1] if i else None
        nxt = numbered[i] if i < len(numbered) else None
        # Right after one event and right before the next are the same gap. Name it by the libvirt call or
        # the journal write it follows when there is one, so that the driver dies right after that write;
        # a save encloses its rename, so the gap inside a save is named by the rename.
        if prev and prev[0] in ("call", "intent", "settle"):
            spec = f"{prev[0]}:{prev[1]}:after"
        elif nxt:
            spec = f"{nxt[0]}:{nxt[1]}:before"
        else:
            spec = f"{prev[0]}:{prev[1]}:after"
        open_intent = None
        for kind, _n, e in numbered[:i]:
            if kind == "intent":
                _, op, address = e.split(" ")
                open_intent = (op, address)
            elif kind == "settle":
                open_intent = None
        saved = sum(1 for kind, _n, _e in numbered[:i] if kind == "rename")
        pid = f"{i:02d}_{_slug(prev[2]) if prev else 'start'}__{_slug(nxt[2]) if nxt else 'end'}"
        points.append(Point(i, spec, pid, open_intent, saved))
    return tuple(points)


POINTS = _points()

def _param(p: Point):
    return pytest.param(p, id=p.id)


# ------------------------------------------------------------------------------------------ helpers




def drive(prog: Path, spec: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DRIVER), str(prog), spec], cwd=prog, capture_output=True, text=True,
                          timeout=60)


def observe_file(node_file: Path):
    with Hypervisor(f"test://{node_file.resolve()}") as hv:
        return hv.observe(), hv.export()


def copy_baseline(baseline: Path, into: Path) -> Path:
    prog = into / PROGRAM
    shutil.copytree(baseline, prog)
    (prog / "main.flow").write_text(AFTER)
    return prog


@dataclass
class Run:
    kill: subprocess.CompletedProcess
    apply: subprocess.CompletedProcess
    plan: subprocess.CompletedProcess
    prog: Path
    killed: Path  # a copy of the state folder as the killed process left it


def kill_and_recover(prog: Path, spec: str) -> Run:
    kill = drive(prog, spec)
    killed = prog.parent / "killed"
    shutil.copytree(prog / ".vmflow", killed)
    apply = vmflow("apply", ".", "--prune", "--auto-approve", cwd=prog)
    plan = vmflow("plan", ".", "--prune", cwd=prog)
    return Run(kill, apply, plan, prog, killed)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """BEFORE applied, then `web` changed once, so that it carries a vmflow snapshot for the kill run to
    prune (the driver keeps one)."""
    prog = tmp_path_factory.mktemp("baseline") / PROGRAM
    prog.mkdir()
    (prog / "main.flow").write_text(BEFORE)
    r = vmflow("apply", ".", "--auto-approve", cwd=prog)
    assert r.returncode == 0, r.stdout + r.stderr
    (prog / "main.flow").write_text(BEFORE.replace("cpu    = 3 .. 8", "cpu    = 2 .. 8"))
    r = vmflow("apply", ".", "--auto-approve", cwd=prog)
    assert r.returncode == 0, r.stdout + r.stderr
    return prog


@pytest.fixture(scope="module")
def baseline_uuids(baseline) -> dict[str, str]:
    actual, _ = observe_file(embedded.node_path(baseline / ".vmflow"))
    return {n: v.uuid for n, v in actual.vms.items()}


@pytest.fixture(scope="module")
def runs(request, baseline, tmp_path_factory):
    """Every selected point, started at once on a pool of threads (the work is in the subprocesses): each
    test then waits for its own point only."""
    here = sys.modules[__name__]
    wanted = [item.callspec.params["point"] for item in request.session.items
              if getattr(item, "originalname", None) == "test_kill_point_recovers" and item.module is here]
    pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2))
    futures: dict[int, Future] = {}
    for p in wanted:
        prog = copy_baseline(baseline, tmp_path_factory.mktemp(f"point{p.index:02d}"))
        futures[p.index] = pool.submit(kill_and_recover, prog, p.spec)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------ tests


def test_the_points_cover_every_kind_of_gap():
    assert len(POINTS) >= 20

    def gap(prev_kind: str, next_kind: str) -> bool:
        return any(EVENTS[p.index - 1].startswith(prev_kind) and EVENTS[p.index].startswith(next_kind)
                   for p in POINTS if 0 < p.index < len(EVENTS))

    assert gap("intent", "call")       # after the intent, before the libvirt call
    assert gap("call", "call")         # between two libvirt calls of one change
    assert gap("call", "settle")       # after the last call, before the outcome
    assert gap("settle", "save")       # after the outcome, before the save
    assert gap("save", "rename")       # the new state written, not yet renamed into place
    assert gap("rename", "intent")     # after the save, before the next change
    assert {p.open_intent[0] for p in POINTS if p.open_intent} == {"create", "update-live", "update-restart",
                                                                   "delete"}
    assert len({p.spec for p in POINTS}) == len(POINTS)


def test_an_uninterrupted_apply_takes_these_steps(baseline, tmp_path):
    """The driver, not killed, applies everything and passes the events the kill points are made of."""
    prog = copy_baseline(baseline, tmp_path)
    r = drive(prog, "none")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"], out["outcomes"]
    assert tuple(out["trace"]) == EVENTS
    r = vmflow("plan", ".", "--prune", cwd=prog)
    assert r.returncode == 0 and "No changes." in r.stdout, r.stdout


@pytest.mark.parametrize("point", [_param(p) for p in POINTS])
def test_kill_point_recovers(point: Point, runs, baseline_uuids):
    r: Run = runs[point.index].result()
    assert r.kill.returncode == -signal.SIGKILL, (point.spec, r.kill.stdout, r.kill.stderr)

    # The killed run left exactly what the point predicts: its saved changes, its open intent, its lock.
    actual, _ = observe_file(r.killed / embedded.NODE_FILE)
    assert {n: (v.vcpus, v.max_vcpus) for n, v in actual.vms.items()} == SAVED_AFTER[point.saved]
    store = Store(r.killed / "vmflow.db")
    try:
        assert [(e.op, e.address) for e in store.unfinished()] == ([point.open_intent] if point.open_intent else [])
        lock = store.lock_info(PROGRAM)
        assert lock is not None and lock.holder == "kill-driver"
    finally:
        store.close()

    # The next apply settles it and converges; a plan then has nothing to do.
    assert r.apply.returncode == 0, r.apply.stdout + r.apply.stderr
    assert r.plan.returncode == 0 and "No changes." in r.plan.stdout, r.plan.stdout + r.plan.stderr

    desired = load(r.prog, None, None).desired
    actual, domains = observe_file(embedded.node_path(r.prog / ".vmflow"))
    assert actual.unmanaged == ()
    assert len(domains) == len(desired), "a domain too many: a VM was duplicated or a stray one appeared"
    assert set(actual.vms) == set(desired)
    for name, want in desired.items():
        got = actual.vms[name]
        assert (got.vcpus, got.max_vcpus, got.memory_kib, got.max_memory_kib, got.running) == \
            (want.vcpus, want.max_vcpus, want.memory_kib, want.max_memory_kib, True), name
        assert got.owner is not None and got.owner.program == PROGRAM
        # An update keeps the domain: recovery never replaces a VM that was only being changed.
        if name in baseline_uuids:
            assert got.uuid == baseline_uuids[name], name
    assert len({v.uuid for v in actual.vms.values()}) == len(actual.vms)

    store = Store(r.prog / ".vmflow" / "vmflow.db")
    try:
        assert store.unfinished() == []
        assert store.lock_info(PROGRAM) is None
    finally:
        store.close()

    recovered = [line for line in r.apply.stdout.splitlines() if line.startswith("recovered: ")]
    if point.open_intent is None:
        assert recovered == []
    else:
        op, address = point.open_intent
        verb = "finished" if op == "delete" else "rolled back"
        assert len(recovered) == 1, recovered
        assert recovered[0].startswith(f"recovered: {address}: an interrupted {op} was {verb}"), recovered[0]
