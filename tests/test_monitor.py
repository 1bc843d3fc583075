"""The monitor and the time-series store: bulk stats on the test driver, rates from counters, windows,
rollups, retention, percentiles, trace replay and Prometheus queries."""

from __future__ import annotations

import gzip
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest

from compiler.program import Compiler
from controller import domain_xml, embedded
from controller.hypervisor import DomainStats, Hypervisor
from controller.monitor import (
    AppSource,
    Deltas,
    LibvirtSource,
    Monitor,
    PrometheusSource,
    ReplaySource,
    Sample,
    apps_in_rules,
    memory_percent,
    read_trace,
)
from controller.state import NicState, Ownership, VmState
from controller.store import Series, series_path

DATA = Path(__file__).parent / "data"
T0 = 1_700_000_100.0  # a 5-minute boundary


def vm_state(name: str, vcpus: int = 2) -> VmState:
    return VmState(name, "linux-base", vcpus, 8, 1024 * 1024, 4 * 1024 * 1024, (),
                   (NicState("lan", "default", None, "virtio"),), owner=Ownership("t", f"vm.{name}", None))


@pytest.fixture
def node(tmp_path: Path) -> Hypervisor:
    """An embedded test-driver node with web0 and web1 running (2 and 4 vCPUs) and web2 defined, stopped."""
    state = tmp_path / "state"
    with Hypervisor(embedded.uri(state)) as hv:
        for name, vcpus in (("web0", 2), ("web1", 4), ("web2", 2)):
            hv.define(domain_xml.render(vm_state(name, vcpus)))
        hv.start("web0")
        hv.start("web1")
        embedded.save(state, hv.export())
    hv = Hypervisor(embedded.uri(state))
    yield hv
    hv.close()


def stats(name="vm", cpu=0, vcpus=2, rd=0, wr=0, rx=0, tx=0, state="running", **kw) -> DomainStats:
    return DomainStats(name, state, cpu_time_ns=cpu, vcpus=vcpus, block_rd_bytes=rd, block_wr_bytes=wr,
                       net_rx_bytes=rx, net_tx_bytes=tx, **kw)


def by(samples, metric):
    return {s.vm: s.value for s in samples if s.metric == metric}


# ------------------------------------------------------------------------------------------ hypervisor


def test_bulk_stats_on_the_test_driver(node: Hypervisor):
    st = node.stats()
    assert set(st) == {"web0", "web1", "web2"}
    assert st["web0"].running and st["web0"].vcpus == 2 and st["web0"].cpu_time_ns > 0
    assert st["web1"].vcpus == 4 and st["web1"].balloon_current_kib == 1024 * 1024
    assert st["web2"].state == "shutoff" and st["web2"].cpu_time_ns is None
    # The test driver has no guest: no guest memory, disk or network counters.
    assert st["web0"].balloon_available_kib is None and st["web0"].block_rd_bytes is None
    assert set(node.stats(["web1", "nosuch"])) == {"web1"}
    assert node.has_agent("web0") is False  # the test driver cannot talk to an agent


def test_monitor_rounds_on_the_test_driver(node: Hypervisor, tmp_path: Path):
    names = ["web0", "web1", "web2"]
    with Series(series_path(tmp_path)) as series:
        monitor = Monitor(LibvirtSource(node, lambda: names), series, interval=10.0)
        t1 = time.time()
        first = monitor.round(t1)
        assert first.samples == 0 and "cpu" not in first.by_metric
        assert any("first time" in n for n in first.notes)
        assert first.errors == ()
        time.sleep(0.2)
        t2 = time.time()
        second = monitor.round(t2)
        assert second.by_metric == {"cpu": 2} and second.vms == 2 and second.notes == ()
        assert second.sampling_seconds >= 0 and second.storing_seconds >= 0
        # The test driver's CPU time is the wall clock: a VM reads as 100/vCPUs % busy.
        (_, v0), = series.window("web0", "cpu", t1, t2)
        (_, v1), = series.window("web1", "cpu", t1, t2)
        assert v0 == pytest.approx(50, abs=8) and v1 == pytest.approx(25, abs=4)
        assert series.window("web2", "cpu", t1, t2) == []
        assert monitor.due(t2 + 5) is False and monitor.due(t2 + 10) is True


# ------------------------------------------------------------------------------------------ rates


def test_rates_from_counter_deltas():
    d = Deltas()
    assert d.update(100.0, {"a": stats("a", cpu=5_000_000_000)}) == []  # a first reading: no rates yet
    assert d.first == 1
    out = d.update(110.0, {"a": stats("a", cpu=5_000_000_000 + 15_000_000_000, rd=40_960, wr=1024,
                                      rx=1_000_000, tx=5)})
    # 15 s of CPU over 10 s on 2 vCPUs = 75%.
    assert by(out, "cpu") == {"a": pytest.approx(75.0)}
    assert by(out, "disk_read") == {"a": 4096.0} and by(out, "disk_write") == {"a": 102.4}
    assert by(out, "net_rx") == {"a": 100_000.0} and by(out, "net_tx") == {"a": 0.5}
    assert d.first == 0
    # vCPUs grew between readings: the rate is over the vCPUs there are now.
    out = d.update(120.0, {"a": stats("a", cpu=20_000_000_000 + 20_000_000_000, vcpus=4, rd=40_960, wr=1024,
                                      rx=1_000_000, tx=5)})
    assert by(out, "cpu") == {"a": pytest.approx(50.0)} and by(out, "disk_read") == {"a": 0.0}


def test_a_restart_resets_the_deltas():
    d = Deltas()
    d.update(0.0, {"a": stats("a", cpu=900_000_000_000, rd=10**9)})
    d.update(10.0, {"a": stats("a", cpu=910_000_000_000, rd=10**9 + 100)})
    # CPU time went backwards: a new process. No rates this round, and it counts as a first reading.
    out = d.update(20.0, {"a": stats("a", cpu=1_000_000_000, rd=5)})
    assert out == [] and d.first == 1
    out = d.update(30.0, {"a": stats("a", cpu=11_000_000_000, rd=105)})
    assert by(out, "cpu") == {"a": pytest.approx(50.0)} and by(out, "disk_read") == {"a": 10.0}
    # One counter going back (a disk detached) drops that metric only.
    out = d.update(40.0, {"a": stats("a", cpu=21_000_000_000, rd=0)})
    assert "disk_read" not in by(out, "disk_read") and by(out, "cpu") == {"a": pytest.approx(50.0)}
    # Stopped: nothing, and the next start measures from scratch.
    assert d.update(50.0, {"a": stats("a", state="shutoff", cpu=None)}) == []
    assert d.update(60.0, {"a": stats("a", cpu=99_000_000_000)}) == [] and d.first == 1


def test_the_same_instant_twice_measures_from_the_older_reading():
    d = Deltas()
    d.update(0.0, {"a": stats("a", cpu=0)})
    assert d.update(0.0, {"a": stats("a", cpu=1_000_000_000)}) == []
    assert by(d.update(10.0, {"a": stats("a", cpu=10_000_000_000)}), "cpu") == {"a": pytest.approx(50.0)}


def test_memory_percent_prefers_usable_memory():
    assert memory_percent(stats(balloon_available_kib=1000, balloon_usable_kib=250, balloon_unused_kib=100)) == 75.0
    assert memory_percent(stats(balloon_available_kib=1000, balloon_unused_kib=100)) == 90.0
    assert memory_percent(stats(balloon_current_kib=1000)) is None
    d = Deltas()
    out = d.update(0.0, {"a": stats("a", balloon_available_kib=1000, balloon_usable_kib=50)})
    assert out == [Sample("a", "memory", 0.0, 95.0)]  # memory needs no second reading


# ------------------------------------------------------------------------------------------ the store


def rounds(series: Series, vms, start: float, n: int, step: float = 10.0, metric: str = "cpu", f=None) -> None:
    f = f or (lambda i, k: float(k % 97) + i)
    for k in range(n):
        series.append([(vm, metric, start + k * step, f(i, k)) for i, vm in enumerate(vms)])


def test_windows_are_exact_on_raw_data_in_memory_and_in_the_file(tmp_path: Path):
    path = tmp_path / "series.db"
    with Series(path) as s:
        rounds(s, ["a", "b"], T0, 100)  # 1,000 s: three closed buckets and an open one
        s.append([("c", "cpu", T0 + 55.0, 0.125)])  # a VM reporting once, in the middle of a round's time
        want = [(T0 + k * 10, float(k % 97)) for k in range(20, 41)]
        assert s.window("a", "cpu", T0 + 200, T0 + 400) == want  # inclusive at both ends
        assert s.window("b", "cpu", T0 + 200, T0 + 200) == [(T0 + 200, 21.0)]
        assert s.window("c", "cpu", T0, T0 + 1000) == [(T0 + 55.0, 0.125)]
        assert s.window("a", "memory", T0, T0 + 1000) == [] and s.window("zz", "cpu", T0, T0 + 1000) == []
        in_memory = s.window("a", "cpu", T0 - 100, T0 + 2000)
        assert len(in_memory) == 100 and in_memory == sorted(in_memory)
    # Reading everything from the file (nothing in memory) gives the same answers.
    with Series(path, recent_seconds=0) as s:
        assert s.window("a", "cpu", T0 - 100, T0 + 2000) == in_memory
        assert s.window("a", "cpu", T0 + 200, T0 + 400) == want
        assert s.window("c", "cpu", T0, T0 + 1000) == [(T0 + 55.0, 0.125)]


def test_condition_metric_names_are_aliases(tmp_path: Path):
    with Series(tmp_path / "s.db") as s:
        s.append([("a", "disk_read", T0, 4096.0)])
        assert s.window("a", "disk.read", T0, T0) == [(T0, 4096.0)]


def test_late_and_repeated_samples(tmp_path: Path):
    with Series(tmp_path / "s.db", recent_seconds=600) as s:
        rounds(s, ["a"], T0, 61)  # up to T0 + 600: the first two buckets are written
        s.append([("a", "cpu", T0 + 15.0, 7.0)])  # late, into a bucket already written
        s.append([("a", "cpu", T0 + 600.0, 1.5), ("a", "cpu", T0 + 600.0, 2.5)])  # the later value wins
        s.append([("a", "cpu", T0 + 601.0, math.nan), ("a", "cpu", T0 + 602.0, math.inf)])  # not kept
        got = s.window("a", "cpu", T0, T0 + 700)
        assert (T0 + 15.0, 7.0) in got and got[-1] == (T0 + 600.0, 2.5) and len(got) == 62
        assert s.latest("a", "cpu") == (T0 + 600.0, 2.5)


def test_aggregates_on_raw_data(tmp_path: Path):
    with Series(tmp_path / "s.db") as s:
        rounds(s, ["a"], T0, 50, f=lambda i, k: float(k))
        assert s.avg("a", "cpu", T0, T0 + 90) == 4.5
        assert s.min("a", "cpu", T0 + 100, T0 + 200) == 10.0 and s.max("a", "cpu", T0, T0 + 200) == 20.0
        assert s.percentile("a", "cpu", T0, T0 + 490, 90) == pytest.approx(np.percentile(np.arange(50.0), 90))
        assert s.avg("a", "cpu", T0 + 5000, T0 + 6000) is None and s.percentile("zz", "cpu", T0, T0 + 1, 50) is None


def test_rollups_and_retention(tmp_path: Path):
    rng = np.random.default_rng(3)
    n = 26 * 360  # 26 hours at 10 s
    values = np.round(rng.gamma(2.0, 12.0, n), 2).astype(np.float32).astype(float)
    path = tmp_path / "s.db"
    with Series(path) as s:
        s.append([("a", "cpu", T0 + 10.0 * k, float(v)) for k, v in enumerate(values)])
        s.append([("b", "cpu", T0, 1.0)])
        end = T0 + 10.0 * n
        exact_p95 = float(np.percentile(values, 95))
        assert s.percentile("a", "cpu", T0, end, 95) == pytest.approx(exact_p95)  # raw: exact
        r = s.retention(end)
        assert r.blocks_deleted > 0 and r.rollups_deleted == 0
        assert r.raw_floor <= end - 24 * 3600 < r.raw_floor + 300
        # The first two hours of raw samples are gone; what is left is exact.
        assert s.window("a", "cpu", T0, T0 + 3600) == []
        assert s.window("a", "cpu", end - 100, end) == [(T0 + 10.0 * k, values[k]) for k in range(n - 10, n)]
    with Series(path) as s:  # the floors are kept with the data
        assert s.raw_floor == r.raw_floor
        # A span reaching before the raw floor is answered from rollups: count, sum, min and max are exact.
        assert s.avg("a", "cpu", T0, end) == pytest.approx(values.mean(), rel=1e-6)
        assert s.max("a", "cpu", T0, end) == values.max() and s.min("a", "cpu", T0, end) == values.min()
        for p in (10, 50, 90, 95, 99):
            approx, exact = s.percentile("a", "cpu", T0, end, p), float(np.percentile(values, p))
            assert approx == pytest.approx(exact, rel=0.05), p
        assert s.percentile("a", "cpu", T0, end, 0) == values.min()
        assert s.percentile("a", "cpu", T0, end, 100) == values.max()
        # A month on, the rollups go too.
        r = s.retention(end + 31 * 86400)
        assert r.rollups_deleted > 0
        assert s.avg("a", "cpu", T0, end) is None and s.window("a", "cpu", T0, end) == []


def test_a_bucket_percentile_from_its_rollup_is_its_quantile(tmp_path: Path):
    values = [float(v) for v in (3, 9, 27, 4, 81, 8, 16, 2, 64, 1, 32, 7, 5, 6, 10, 11, 12, 13, 14, 15)]
    with Series(tmp_path / "s.db", raw_seconds=0) as s:
        s.append([("a", "cpu", T0 + 10.0 * k, v) for k, v in enumerate(values)])
        s.retention(T0 + 300)  # closes the bucket and drops raw: only the rollup is left
        span = max(values) - min(values)
        for p in (10, 25, 50, 75, 90, 95):
            assert s.percentile("a", "cpu", T0, T0 + 299, p) == pytest.approx(
                np.percentile(values, p, method="hazen"), abs=span / 255 + 1e-6)


def test_the_store_survives_reopening(tmp_path: Path):
    path = tmp_path / "s.db"
    with Series(path) as s:
        rounds(s, ["a", "b"], T0, 45)  # one bucket written, the next one open (in `pending`)
        s.append([("a", "app:nginx", T0 + 440, 1.0), ("b", "app:nginx", T0 + 440, -1.0)])
        before = s.window("b", "cpu", T0, T0 + 1000)
        size = s.size_bytes()
    assert size > 0
    with Series(path) as s:
        assert s.window("b", "cpu", T0, T0 + 1000) == before
        assert s.app("a", "nginx") == "running" and s.app("b", "nginx") is None and s.app("a", "x") is None
        rounds(s, ["a", "b"], T0 + 450, 20)  # the open bucket goes on filling and closes
        got = s.window("b", "cpu", T0, T0 + 1000)
        assert len(got) == 65 and got[:45] == before
        assert s.footprint()["raw"] > 0


# ------------------------------------------------------------------------------------------ applications


class AgentStub:
    """The adapter's guest-agent side, for the app source: web0 runs nginx, web1's agent is silent,
    web2 has no agent channel."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []

    def has_agent(self, name: str) -> bool:
        return name != "web2"

    def running(self, name: str) -> bool:
        return True

    def app_running(self, name: str, app: str, timeout: float = 5.0) -> bool | None:
        self.asked.append((name, app))
        return None if name == "web1" else app == "nginx"


def test_app_states_through_the_guest_agent(tmp_path: Path):
    stub = AgentStub()
    wanted = {"web0": ("nginx", "redis"), "web1": ("nginx",), "web2": ("nginx",)}
    src = AppSource(stub, lambda: wanted)
    assert src.states(T0) == {"web0": {"nginx": "running", "redis": "stopped"}}
    assert ("web2", "nginx") not in stub.asked and any("web1" in e for e in src.errors)
    with Series(tmp_path / "s.db") as s:
        Monitor(src, s).round(T0 + 10)
        assert s.app("web0", "nginx") == "running" and s.app("web0", "redis") == "stopped"
        assert s.app("web1", "nginx") is None and s.app("web2", "nginx") is None


def test_no_app_states_on_the_test_driver(node: Hypervisor):
    assert AppSource(node, lambda: {"web0": ("nginx",)}).sample(T0) == []


def test_apps_in_rules(tmp_path: Path):
    (tmp_path / "p.flow").write_text(
        'vm web {\n  image  = linux-base\n  cpu    = 2 .. 4\n  memory = 1GiB .. 2GiB\n'
        '  morph grow when cpu > 80% and not app("nginx") running {\n    cpu += 1\n    cooldown 5m\n'
        '    revert when app("worker") running\n  }\n}\n'
        'vm db {\n  image  = linux-base\n  cpu    = 2\n  memory = 1GiB\n}\n')
    comp = Compiler().compile_path(tmp_path)
    assert comp.ok, comp.diagnostics
    assert apps_in_rules(comp.program.vms.values()) == {"web": ("nginx", "worker")}


# ------------------------------------------------------------------------------------------ replay


def test_replay_of_a_trace_file():
    src = ReplaySource(DATA / "trace-small.csv", {"web": "web", "db": "db"}, start=0.0)
    web, db = src.traces["web"], src.traces["db"]
    assert web.cores == 4 and db.cores == 2  # a row saying 0 cores does not count
    assert len(db.offsets) == 72  # the duplicate row is one point
    assert len(web.offsets) == 71 and 40 * 300.0 not in web.offsets  # a hole stays a hole
    assert web.offsets[10] == 3000.0  # a jittered row is put on the grid
    assert src.duration == 71 * 300.0
    got = src.sample(0.0)
    assert {(s.vm, s.metric) for s in got} == {(vm, m) for vm in ("web", "db") for m in
                                               ("cpu", "memory", "disk_read", "disk_write", "net_rx", "net_tx")}
    assert by(got, "cpu")["web"] == pytest.approx(2288.0 / 10400 * 100)
    assert by(got, "disk_read")["web"] == 120_000.0  # KB/s
    assert src.sample(0.0) == [] and src.sample(299.0) == []  # nothing new until the next point
    every = got + [s for now in range(300, 6 * 3600, 10) for s in src.sample(float(now))]
    cpu = [(s.t, s.value) for s in every if s.vm == "web" and s.metric == "cpu"]
    assert len(cpu) == 71 and len({t for t, _ in cpu}) == 71  # each point once
    burst = [t for t, v in cpu if v > 80]
    assert burst and min(burst) == 24 * 300.0
    mem = [(s.t, s.value) for s in every if s.vm == "db" and s.metric == "memory"]
    assert max(v for _, v in mem) > 90 and all(v < 90 for t, v in mem if t < 3 * 3600)


def test_replay_of_gzip_traces_in_a_folder(tmp_path: Path):
    text = (DATA / "trace-small.csv").read_text().splitlines()
    header = text[0].split(",", 1)[1]
    rows = [line.split(",", 1)[1] for line in text[1:] if line.startswith("db,")]
    with gzip.open(tmp_path / "17.csv.gz", "wt") as f:
        f.write("\n".join([header, *rows]) + "\n")
    src = ReplaySource(tmp_path, {"db1": "17", "db2": "17.csv.gz"}, start=T0)
    assert read_trace(tmp_path / "17.csv.gz").keys() == {"17"}
    got = src.sample(T0 + 600)
    assert {s.vm for s in got} == {"db1", "db2"} and {s.t for s in got} == {T0, T0 + 300, T0 + 600}
    with pytest.raises(ValueError, match="no trace file"):
        ReplaySource(tmp_path, {"x": "18"})


def test_replay_into_the_store(tmp_path: Path):
    src = ReplaySource(DATA / "trace-small.csv", {"web": "web"}, start=T0)
    with Series(tmp_path / "s.db") as s:
        monitor = Monitor(src, s, interval=300)
        for k in range(40):
            monitor.round(T0 + 300 * k)
        got = s.window("web", "cpu", T0, T0 + 3 * 3600)
        assert len(got) == 37 and s.max("web", "cpu", T0, T0 + 3 * 3600) > 80


# ------------------------------------------------------------------------------------------ Prometheus


class Prom(BaseHTTPRequestHandler):
    def do_GET(self):
        q = parse_qs(urlparse(self.path).query)
        query, at = q["query"][0], float(q["time"][0])
        if "slow" in query:
            time.sleep(1.0)
        if "bad" in query:
            return self.reply(400, {"status": "error", "errorType": "bad_data", "error": "parse error at char 4"})
        if query.startswith("cpu_by_vm"):
            result = [{"metric": {"vm": "web0"}, "value": [at, "12.5"]},
                      {"metric": {"vm": "web1"}, "value": [at, "NaN"]},
                      {"metric": {"instance": "x"}, "value": [at, "3"]}]
        elif query.startswith("mem{"):
            vm = query.split('"')[1]
            result = [{"metric": {"instance": vm}, "value": [at, "61.5" if vm == "web0" else "7"]}]
        else:
            return self.reply(200, {"status": "success", "data": {"resultType": "scalar", "result": [at, "2"]}})
        self.reply(200, {"status": "success", "data": {"resultType": "vector", "result": result}})

    def reply(self, code: int, doc: dict) -> None:
        body = json.dumps(doc).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting (the timeout test): nobody to answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def prometheus():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Prom)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_prometheus_queries(prometheus: str):
    src = PrometheusSource(prometheus, {"cpu": "cpu_by_vm", "memory": 'mem{instance="{vm}"}'},
                           names_fn=lambda: ["web0", "web1"], timeout=2.0)
    got = sorted(src.sample(T0))
    assert src.errors == []
    assert got == sorted([Sample("web0", "cpu", T0, 12.5), Sample("web0", "memory", T0, 61.5),
                          Sample("web1", "memory", T0, 7.0)])
    assert src.query("scalar()", T0) == [({}, 2.0)]


def test_prometheus_errors_are_reported_not_raised(prometheus: str, tmp_path: Path):
    src = PrometheusSource(prometheus, {"cpu": "bad query {vm}", "memory": "slow_query", "disk_read": "cpu_by_vm"},
                           names_fn=lambda: ["web0"], timeout=0.3)
    got = src.sample(T0)
    assert got == [Sample("web0", "disk_read", T0, 12.5)]
    text = " | ".join(sorted(src.errors))
    assert "bad_data: parse error at char 4" in text and "memory" in text and len(src.errors) == 2
    down = PrometheusSource("http://127.0.0.1:9", {"cpu": "up"}, timeout=0.5)
    with Series(tmp_path / "s.db") as s:
        res = Monitor([down, src], s).round(T0)
    assert res.samples == 1 and any("cannot reach" in e for e in res.errors)


def test_a_failing_source_does_not_stop_the_others(tmp_path: Path):
    class Broken:
        def __init__(self) -> None:
            self.errors: list[str] = []

        def sample(self, now):
            raise RuntimeError("boom")

    class One:
        def __init__(self) -> None:
            self.errors: list[str] = []

        def sample(self, now):
            return [Sample("a", "cpu", now, 1.0)]

    with Series(tmp_path / "s.db") as s:
        res = Monitor([Broken(), One()], s).round(T0)
        assert res.samples == 1 and res.errors == ("Broken: RuntimeError: boom",)
        assert s.window("a", "cpu", T0, T0) == [(T0, 1.0)]
