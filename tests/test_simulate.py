"""`vmflow simulate` and `vmflow events`, end to end through the real command.

The seed case replays tests/data/trace-small.csv against examples/simulate: `web` replays the trace whose CPU
bursts above 80% from 2 h to 2 h 35 min (its `grow` morph adds two vCPUs at a time up to 8, then reverts
once the CPU has stayed under 30% for 30 minutes), `db` the one whose memory climbs past 90% from 5 h 10 min
(its `bigger` morph swaps in linux-base-large). Its text and JSON output are snapshots under
tests/golden/simulate/; `VMFLOW_BLESS=1` rewrites them (read the diff as you would read code).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from cli_runner import ROOT, vmflow
from controller.simulate import parse_map, parse_time
from controller.store import Store
from test_golden import check_snapshot

GOLDEN = ROOT / "tests" / "golden" / "simulate"
TRACE = "tests/data/trace-small.csv"
PROGRAM = "examples/simulate"
SEED = (PROGRAM, "--metrics", TRACE, "--map", "web=web", "--map", "db=db")


def _one_line_error(r, *needles: str) -> str:
    """The command failed with one `error:` line naming what is wrong, and no traceback."""
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


# ------------------------------------------------------------------------------------------ the seed case


@pytest.fixture(scope="module")
def seed_json() -> dict:
    r = vmflow("simulate", *SEED, "--format", "json")
    assert r.returncode == 0, r.stderr
    check_snapshot(GOLDEN / "seed.json", r.stdout)
    return json.loads(r.stdout)


def test_seed_text_snapshot() -> None:
    r = vmflow("simulate", *SEED)
    assert r.returncode == 0, r.stderr
    assert "\x1b[" not in r.stdout  # NO_COLOR is set by the runner
    check_snapshot(GOLDEN / "seed.txt", r.stdout)


def test_seed_json_snapshot(seed_json: dict) -> None:
    assert seed_json["format_version"] == 1
    (sim,) = seed_json["simulations"]
    assert sim["program"] == "simulate" and sim["trace"] == TRACE
    assert sim["interval_s"] == 300 and sim["mapping"] == {"db": "db", "web": "web"}


def test_cpu_burst_adds_cores_and_memory_climb_swaps_the_image(seed_json: dict) -> None:
    (sim,) = seed_json["simulations"]
    acted = [(e["vm"], e["morph"], e["outcome"], e["size"]["vcpus"], e["size"]["image"]) for e in sim["timeline"]
             if e["outcome"] in ("applied", "reverted")]
    grow = [(o, cpu) for vm, m, o, cpu, _img in acted if (vm, m) == ("web", "grow")]
    # 2 → 4 → 6 → 8 while the burst lasts (one step per 10-minute cooldown), then back to the base.
    assert grow == [("applied", 4), ("applied", 6), ("applied", 8), ("reverted", 2)]
    first = next(e for e in sim["timeline"] if e["vm"] == "web" and e["outcome"] == "applied")
    assert first["offset_s"] == 7200  # the first sample above 80% covers `for 5m` on its own
    bigger = [(o, img) for vm, m, o, _cpu, img in acted if (vm, m) == ("db", "bigger")]
    assert bigger == [("applied", "linux-base-large")]
    vms = {v["name"]: v for v in sim["vms"]}
    assert vms["web"]["peak"]["vcpus"] == 8 and vms["web"]["final"]["vcpus"] == 2
    assert vms["db"]["final"]["image"] == "linux-base-large"
    assert vms["web"]["applied"] == 3 and vms["web"]["reverted"] == 1
    rules = {(r["vm"], r["morph"]): r for r in sim["rules"]}
    assert rules[("web", "grow")]["held_s"] > 0 and rules[("db", "bigger")]["held_s"] > 0
    assert rules[("web", "bigger")]["held_s"] == 0
    (pool,) = sim["pools"]
    assert pool["name"] == "rack1" and pool["capacity"]["vcpus"] == 16
    assert pool["peak"]["vcpus"] == 10  # web at 8 and db at 2


def test_interval_and_window() -> None:
    r = vmflow("simulate", *SEED, "--start", "1h", "--end", "3h", "--interval", "10m", "--format", "json")
    assert r.returncode == 0, r.stderr
    (sim,) = json.loads(r.stdout)["simulations"]
    assert sim["duration_s"] == 7200 and sim["interval_s"] == 600 and sim["steps"] == 13
    assert all(0 <= e["offset_s"] <= 7200 for e in sim["timeline"])
    assert any(e["vm"] == "web" and e["outcome"] == "applied" for e in sim["timeline"])


def test_a_vm_without_a_trace_is_named() -> None:
    r = vmflow("simulate", PROGRAM, "--metrics", TRACE, "--map", "web=web")
    assert r.returncode == 0, r.stderr
    assert "`db` has no trace" in r.stdout


# ------------------------------------------------------------------------------------------ bad input


def test_unknown_vm_in_map() -> None:
    r = vmflow("simulate", PROGRAM, "--metrics", TRACE, "--map", "cache=web")
    _one_line_error(r, "`cache`", "not a VM", "db, web")


def test_unknown_trace_id() -> None:
    r = vmflow("simulate", PROGRAM, "--metrics", TRACE, "--map", "web=nosuch")
    _one_line_error(r, "`nosuch`", "`web`", TRACE, "db, web")


def test_missing_trace_file() -> None:
    r = vmflow("simulate", PROGRAM, "--metrics", "tests/data/no-such-trace.csv", "--map", "web=web")
    _one_line_error(r, "tests/data/no-such-trace.csv", "does not exist")


def test_missing_program() -> None:
    r = vmflow("simulate", "examples/no-such-program", "--metrics", TRACE, "--map", "web=web")
    _one_line_error(r, "examples/no-such-program", "does not exist")


def test_a_program_that_does_not_compile(tmp_path: Path) -> None:
    (tmp_path / "bad.flow").write_text("vm web {\n  image = linux-bse\n  cpu = 2\n  memory = 4GiB\n}\n")
    r = vmflow("simulate", str(tmp_path), "--metrics", str(ROOT / TRACE), "--map", "web=web")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "error[" in r.stderr and "linux-bse" in r.stderr
    assert "nothing was simulated" in r.stderr


@pytest.mark.parametrize("args", [
    ("--metrics", TRACE, "--map", "web"),  # no `=`
    ("--metrics", TRACE),  # no --map at all
    ("--map", "web=web"),  # no --metrics
    ("--metrics", TRACE, "--map", "web=web", "--interval", "soon"),
    ("--metrics", TRACE, "--map", "web=web", "--start", "yesterday"),
], ids=["map-shape", "no-map", "no-metrics", "interval", "start"])
def test_bad_usage_exits_64(args: tuple[str, ...]) -> None:
    r = vmflow("simulate", PROGRAM, *args)
    assert r.returncode == 64, r.stdout + r.stderr
    assert "Traceback" not in r.stderr


def test_parse_map_and_time() -> None:
    assert parse_map(["web=41", " db = 52 "]) == {"web": "41", "db": "52"}
    for bad in (["web"], ["=41"], ["web="], ["web=1", "web=2"]):
        with pytest.raises(ValueError):
            parse_map(bad)
    assert parse_time("1d12h30m") == 131400.0
    assert parse_time("90s") == 90.0
    assert parse_time("2013-08-05T14:00").timestamp() == 1375711200
    with pytest.raises(ValueError):
        parse_time("soon")


# ------------------------------------------------------------------------------------------ events


def _events_in(state: Path) -> list:
    store = Store(state / "vmflow.db")
    try:
        return store.events(limit=1000)
    finally:
        store.close()


def test_a_simulation_leaves_the_users_state_alone(tmp_path: Path) -> None:
    """The simulation's hypervisor, journal, series and events live in a temporary folder that is removed:
    neither the state beside the program nor the state in the working folder gets anything."""
    shutil.copytree(ROOT / PROGRAM, tmp_path / "shop")
    state = tmp_path / ".vmflow"
    store = Store(state / "vmflow.db")
    store.add_event("shop", "web", "reconcile", "synced", "an earlier event", at=1_700_000_000.0)
    store.close()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    r = vmflow("simulate", "shop", "--metrics", str(ROOT / TRACE), "--map", "web=web", "--map", "db=db",
               cwd=tmp_path, env={"TMPDIR": str(scratch), "VMFLOW_STATE_DIR": str(state)})
    assert r.returncode == 0, r.stderr
    assert "applied" in r.stdout
    assert not (tmp_path / "shop" / ".vmflow").exists()
    assert not list(scratch.glob("vmflow-simulate-*"))  # the private state is gone
    assert [e.message for e in _events_in(state)] == ["an earlier event"]
    r = vmflow("events", "--state-dir", str(state))
    assert r.returncode == 0 and r.stdout.count("\n") == 1 and "an earlier event" in r.stdout


@pytest.fixture
def state_with_events(tmp_path: Path) -> Path:
    now = time.time()
    store = Store(tmp_path / "vmflow.db")
    store.add_event("web", "web", "morph", "applied", "cpu 91% > 80% for 5m: cpu 2 → 4", {"cpu": 4}, at=now - 7200)
    store.add_event("web", "web", "morph", "skipped-cooldown", "cpu 93% > 80% for 5m; cooldown 10m, 4m left",
                    at=now - 1800)
    store.add_event("web", None, "reconcile", "synced", "revision 3f2c1a9", at=now - 600)
    store.add_event("db", "db", "morph", "applied", "memory 95% > 90% for 2m: image linux-base → linux-base-large",
                    at=now - 60)
    store.close()
    return tmp_path


def test_events_newest_first(state_with_events: Path) -> None:
    r = vmflow("events", "--state-dir", str(state_with_events))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 4
    assert "db" in lines[0] and "morph/applied" in lines[0] and "linux-base-large" in lines[0]
    assert "reconcile/synced" in lines[1] and " - " in lines[1]  # no VM
    assert "cpu 2 → 4" in lines[3]


def test_events_filters(state_with_events: Path) -> None:
    d = str(state_with_events)

    def messages(*args: str) -> list[str]:
        r = vmflow("events", "--state-dir", d, "--format", "json", *args)
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["format_version"] == 1
        return [e["message"] for e in doc["events"]]

    assert messages("--vm", "web", "--kind", "morph") == ["cpu 93% > 80% for 5m; cooldown 10m, 4m left",
                                                          "cpu 91% > 80% for 5m: cpu 2 → 4"]
    assert messages("--program", "web", "-n", "1") == ["revision 3f2c1a9"]
    assert len(messages("--since", "1h")) == 3
    assert messages("--kind", "rollback") == []


def test_events_without_state_or_with_bad_options(tmp_path: Path) -> None:
    r = vmflow("events", "--state-dir", str(tmp_path / "nothing"))
    _one_line_error(r, "no vmflow state")
    r = vmflow("events", "--state-dir", str(tmp_path), "--since", "a while")
    assert r.returncode == 64 and "Traceback" not in r.stderr
