"""The monitor: run-time samples of every VM, into the time-series store, round after round.

    runtime:  monitor ─▶ time-series store (controller/store.py `Series`) ─▶ rule engine ─▶ plan ─▶ apply

A source turns "now" into samples (`Sample(vm, metric, t, value)`): `LibvirtSource` reads every domain's
counters in one bulk call and derives rates from the previous round, `AppSource` asks the guest agent
whether the applications that rules mention are running, `PrometheusSource` runs PromQL instant queries,
and `ReplaySource` plays back recorded traces in simulated time (`vmflow simulate`). `Monitor.round(now)`
samples every source and stores the result; the caller then evaluates the rules on the store.

Metrics (specs/monitoring.md): `cpu` and `memory` in percent, `disk_read`, `disk_write`, `net_rx`, `net_tx`
in bytes per second; application states as `app:<name>` (1 running, 0 stopped, -1 unknown).
"""

from __future__ import annotations

import bisect
import csv
import gzip
import json
import math
import statistics
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

from compiler import model as M
from controller.hypervisor import DomainStats, Hypervisor, HypervisorError
from controller.store import APP_PREFIX

METRICS = ("cpu", "memory", "disk_read", "disk_write", "net_rx", "net_tx")
RATE_METRICS = ("cpu", "disk_read", "disk_write", "net_rx", "net_tx")  # need two readings


class Sample(NamedTuple):
    vm: str
    metric: str
    t: float
    value: float


class Source(Protocol):
    """What `Monitor` samples. `errors` holds what went wrong in the last `sample` call (sources report
    failures there and return what they could, rather than raising)."""

    errors: list[str]

    def sample(self, now: float) -> list[Sample]: ...


# ------------------------------------------------------------------------------------------ libvirt


def memory_percent(st: DomainStats) -> float | None:
    """Memory in use, as the guest's kernel counts it: (available − usable) / available, i.e. MemTotal −
    MemAvailable, which leaves out page cache the guest would give back. A guest that does not report
    `usable` (no MemAvailable) falls back to available − unused (MemFree), which counts cache as used.
    None without guest memory statistics (no balloon driver or stats period, or the test driver)."""
    avail = st.balloon_available_kib
    if not avail:
        return None
    if st.balloon_usable_kib is not None:
        used = avail - st.balloon_usable_kib
    elif st.balloon_unused_kib is not None:
        used = avail - st.balloon_unused_kib
    else:
        return None
    pct = used / avail * 100.0
    return 0.0 if pct < 0 else 100.0 if pct > 100 else pct


class Deltas:
    """Rates from successive readings of cumulative counters, per VM.

    `cpu` = CPU-time delta / (wall-clock delta × vCPUs now) × 100; disk and network = byte delta / wall
    delta. A VM's first reading gives `memory` only: the rates need a second one. A VM whose CPU time went
    backwards restarted (a new process, counters from zero): its previous reading is dropped and the round
    counts as its first. A single counter going backwards (a disk or NIC detached) gives no sample of that
    metric this round. A VM that is not running gives nothing and loses its previous reading."""

    def __init__(self) -> None:
        self._prev: dict[str, tuple[float, DomainStats]] = {}
        self.first: int = 0  # VMs read for the first time (or again after a restart) in the last update

    def update(self, now: float, stats: Mapping[str, DomainStats]) -> list[Sample]:
        out: list[Sample] = []
        add = out.append
        # Samples are built with tuple.__new__ directly: the named tuple's own constructor is a Python-level
        # call, and this loop makes six samples per VM per round.
        new, S = tuple.__new__, Sample
        first = 0
        prev_all = self._prev
        fresh: dict[str, tuple[float, DomainStats]] = {}
        for name, st in stats.items():
            if not st.running:
                continue
            fresh[name] = (now, st)
            mem = memory_percent(st)
            if mem is not None:
                add(new(S, (name, "memory", now, mem)))
            prev = prev_all.get(name)
            if prev is None:
                first += 1
                continue
            t0, p = prev
            wall = now - t0
            if wall <= 0:
                fresh[name] = prev  # the same instant again: keep the older reading to measure from
                continue
            a, b = p.cpu_time_ns, st.cpu_time_ns
            if a is not None and b is not None:
                if b < a:
                    first += 1
                    continue
                if st.vcpus:  # ns of CPU / (s × 1e9 ns × vCPUs) × 100%: / 1e7
                    add(new(S, (name, "cpu", now, (b - a) / (wall * 1e7 * st.vcpus))))
            # Spelled out rather than looped over names: this runs for every VM every round.
            a, b = p.block_rd_bytes, st.block_rd_bytes
            if a is not None and b is not None and b >= a:
                add(new(S, (name, "disk_read", now, (b - a) / wall)))
            a, b = p.block_wr_bytes, st.block_wr_bytes
            if a is not None and b is not None and b >= a:
                add(new(S, (name, "disk_write", now, (b - a) / wall)))
            a, b = p.net_rx_bytes, st.net_rx_bytes
            if a is not None and b is not None and b >= a:
                add(new(S, (name, "net_rx", now, (b - a) / wall)))
            a, b = p.net_tx_bytes, st.net_tx_bytes
            if a is not None and b is not None and b >= a:
                add(new(S, (name, "net_tx", now, (b - a) / wall)))
        self._prev = fresh
        self.first = first
        return out


class LibvirtSource:
    """Counters of every managed VM from one bulk statistics call per round. `names_fn` gives the VMs to
    sample (the program's VMs); None samples every domain."""

    def __init__(self, hv: Hypervisor, names_fn: Callable[[], Iterable[str]] | None = None) -> None:
        self.hv = hv
        self.names_fn = names_fn
        self.deltas = Deltas()
        self.errors: list[str] = []
        self.notes: list[str] = []
        self.vms = 0

    def sample(self, now: float) -> list[Sample]:
        self.errors, self.notes = [], []
        try:
            stats = self.hv.stats(None if self.names_fn is None else self.names_fn())
        except HypervisorError as e:
            self.errors.append(str(e))
            return []
        out = self.deltas.update(now, stats)
        self.vms = len(stats)
        if self.deltas.first:
            self.notes.append(f"{self.deltas.first} VM(s) read for the first time (or since a restart): no cpu, "
                              "disk or network rates until their next reading")
        return out


# ------------------------------------------------------------------------------------------ applications


def apps_in_rules(vms: Iterable[M.VmSpec]) -> dict[str, tuple[str, ...]]:
    """The applications each VM's morph rules ask about (`app("nginx") running`), for `AppSource`."""
    def walk(c, into: set[str]) -> None:
        if isinstance(c, M.App):
            into.add(c.name)
        elif isinstance(c, (M.AllOf, M.AnyOf)):
            for item in c.items:
                walk(item, into)
        elif isinstance(c, M.Negate):
            walk(c.item, into)

    out: dict[str, tuple[str, ...]] = {}
    for vm in vms:
        names: set[str] = set()
        for m in vm.morphs:
            walk(m.condition, names)
            if m.revert is not None:
                walk(m.revert, names)
        if names:
            out[vm.name] = tuple(sorted(names))
    return out


class AppSource:
    """Whether applications run in the guests, through the guest agent (`pidof`, as the health check), for
    the VMs whose rules mention `app(...)` (`apps_fn`, e.g. `apps_in_rules` of the program) and that have an
    agent channel. Samples are `app:<name>`: 1 running, 0 stopped, -1 when the agent did not answer.
    Checks run a few at a time; each waits at most `timeout` seconds."""

    def __init__(self, hv: Hypervisor, apps_fn: Callable[[], Mapping[str, Iterable[str]]], *,
                 timeout: float = 5.0, parallel: int = 8) -> None:
        self.hv = hv
        self.apps_fn = apps_fn
        self.timeout = timeout
        self.parallel = parallel
        self.errors: list[str] = []
        self._agent: dict[str, bool] = {}

    def states(self, now: float) -> dict[str, dict[str, str]]:
        """{vm: {app: "running" | "stopped"}}; an application whose check got no answer is left out."""
        out: dict[str, dict[str, str]] = {}
        for s in self.sample(now):
            if s.value >= 0:
                out.setdefault(s.vm, {})[s.metric[len(APP_PREFIX):]] = "running" if s.value >= 0.5 else "stopped"
        return out

    def sample(self, now: float) -> list[Sample]:
        self.errors = []
        wanted = {vm: tuple(apps) for vm, apps in self.apps_fn().items() if apps}
        checks = [(vm, app) for vm, apps in wanted.items() if self._has_agent(vm) for app in apps]
        if not checks:
            return []

        def check(item: tuple[str, str]) -> Sample:
            vm, app = item
            try:
                running = self.hv.running(vm) and self.hv.app_running(vm, app, self.timeout)
                if running is None:
                    self.errors.append(f"{vm}: the guest agent did not answer about `{app}`")
            except HypervisorError as e:
                self.errors.append(str(e))
                running = None
            return Sample(vm, APP_PREFIX + app, now, -1.0 if running is None else float(bool(running)))

        with ThreadPoolExecutor(max_workers=max(1, min(self.parallel, len(checks)))) as pool:
            return list(pool.map(check, checks))

    def _has_agent(self, vm: str) -> bool:
        # Whether a domain has an agent channel changes only with its definition: asked once per VM.
        known = self._agent.get(vm)
        if known is None:
            try:
                known = self._agent[vm] = self.hv.has_agent(vm)
            except HypervisorError as e:
                self.errors.append(str(e))
                return False
        return known


# ------------------------------------------------------------------------------------------ Prometheus


class PrometheusSource:
    """PromQL instant queries over HTTP (`GET <url>/api/v1/query?query=...&time=now`). Each entry of
    `queries` maps a metric to a PromQL template: with `{vm}` in it, it runs once per VM of `names_fn`
    and its first series is that VM's value; without, it runs once per round and each series' `label`
    names the VM. Failures (unreachable, timeout, a PromQL error, a malformed reply) land in `errors`;
    the other queries still run."""

    def __init__(self, url: str, queries: Mapping[str, str], *,
                 names_fn: Callable[[], Iterable[str]] | None = None, label: str = "vm",
                 timeout: float = 5.0, parallel: int = 8) -> None:
        self.url = url.rstrip("/")
        self.queries = dict(queries)
        self.names_fn = names_fn
        self.label = label
        self.timeout = timeout
        self.parallel = parallel
        self.errors: list[str] = []

    def sample(self, now: float) -> list[Sample]:
        self.errors = []
        jobs: list[tuple[str, str | None, str]] = []
        names = list(self.names_fn()) if self.names_fn is not None else []
        for metric, template in self.queries.items():
            if "{vm}" in template:
                jobs += [(metric, vm, template.replace("{vm}", vm)) for vm in names]
            else:
                jobs.append((metric, None, template))
        if not jobs:
            return []

        def run(job: tuple[str, str | None, str]) -> list[Sample]:
            metric, vm, promql = job
            try:
                result = self.query(promql, now)
            except PromError as e:
                self.errors.append(f"{metric}{f' of {vm}' if vm else ''}: {e}")
                return []
            out = []
            for owner, value in result:
                who = vm if vm is not None else owner.get(self.label)
                if who is not None and math.isfinite(value):
                    out.append(Sample(who, metric, now, value))
                    if vm is not None:
                        break  # a per-VM query: its first series is the VM's value
            return out

        with ThreadPoolExecutor(max_workers=max(1, min(self.parallel, len(jobs)))) as pool:
            return [s for part in pool.map(run, jobs) for s in part]

    def query(self, promql: str, at: float) -> list[tuple[dict[str, str], float]]:
        """One instant query: [(labels, value)] (a scalar result has no labels)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql, "time": f"{at:.3f}"})
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            body = e.read()  # Prometheus explains a bad query in the body of its 400/422
            raise PromError(_prom_error(body) or f"HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            raise PromError(f"cannot reach {self.url}: {getattr(e, 'reason', e)}") from None
        try:
            doc = json.loads(body)
            if doc.get("status") != "success":
                raise PromError(_prom_error(body) or "the reply's status is not success")
            data = doc["data"]
            if data["resultType"] == "scalar":
                return [({}, float(data["result"][1]))]
            if data["resultType"] != "vector":
                raise PromError(f"expected an instant vector, got a {data['resultType']}")
            return [(item.get("metric", {}), float(item["value"][1])) for item in data["result"]]
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise PromError(f"malformed reply: {e}") from None


class PromError(Exception):
    pass


def _prom_error(body: bytes) -> str | None:
    try:
        doc = json.loads(body)
        return f"{doc.get('errorType', 'error')}: {doc['error']}" if "error" in doc else None
    except (ValueError, TypeError):
        return None


# ------------------------------------------------------------------------------------------ replay


TRACE_STEP = 300.0  # the recorded traces sample every 5 minutes


@dataclass
class Trace:
    """One VM's recorded samples on a regular grid: times relative to its start, values per metric."""

    offsets: list[float]
    values: dict[str, list[float | None]]
    cores: int | None = None
    source: str = ""


def read_trace(path: Path, step: float = TRACE_STEP) -> dict[str, Trace]:
    """A trace CSV (plain or gzip), shaped like the GWA-T-12 Bitbrains files: `timestamp_s, cpu_cores,
    cpu_capacity_mhz, cpu_usage_mhz, mem_capacity_kb, mem_usage_kb, disk_read_kbps, disk_write_kbps,
    net_rx_kbps, net_tx_kbps`. An optional `trace_id` column holds several traces in one file; without
    it the file is one trace, keyed by its name without extensions.

    Rows are put on a grid of `step` seconds from the first one (each to the nearest point: jitter);
    of two rows on one point the later wins (duplicates); missing points stay missing (holes).
    cpu = usage / capacity × 100, memory = used / provisioned × 100, KB/s = 1000 bytes/s."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.DictReader(f))
    by_id: dict[str, list[dict[str, str]]] = {}
    default = path.name.split(".")[0]
    for row in rows:
        by_id.setdefault(row.get("trace_id") or default, []).append(row)
    return {tid: _grid(rs, step, f"{path}:{tid}") for tid, rs in by_id.items()}


def _num(row: Mapping[str, str], key: str) -> float | None:
    try:
        v = float(row[key])
    except (KeyError, TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b * 100.0 if a is not None and b else None


def _kbps(v: float | None) -> float | None:
    return v * 1000.0 if v is not None else None


def _grid(rows: list[dict[str, str]], step: float, source: str) -> Trace:
    stamped = [(t, r) for r in rows if (t := _num(r, "timestamp_s")) is not None]
    stamped.sort(key=lambda x: x[0])
    if not stamped:
        return Trace([], {m: [] for m in METRICS}, None, source)
    t0 = stamped[0][0]
    points: dict[int, dict[str, str]] = {}
    for t, r in stamped:
        points[round((t - t0) / step)] = r
    keys = sorted(points)
    values: dict[str, list[float | None]] = {m: [] for m in METRICS}
    for k in keys:
        r = points[k]
        values["cpu"].append(_ratio(_num(r, "cpu_usage_mhz"), _num(r, "cpu_capacity_mhz")))
        values["memory"].append(_ratio(_num(r, "mem_usage_kb"), _num(r, "mem_capacity_kb")))
        values["disk_read"].append(_kbps(_num(r, "disk_read_kbps")))
        values["disk_write"].append(_kbps(_num(r, "disk_write_kbps")))
        values["net_rx"].append(_kbps(_num(r, "net_rx_kbps")))
        values["net_tx"].append(_kbps(_num(r, "net_tx_kbps")))
    cores = [c for _, r in stamped if (c := _num(r, "cpu_cores"))]
    return Trace([k * step for k in keys], values, int(statistics.median(cores)) if cores else None, source)


class ReplaySource:
    """Recorded traces played back in simulated time. `path` is a trace file or a folder of them;
    `mapping` gives each VM its trace: an id (a `trace_id` in the file, or a file in the folder named
    `<id>.csv` or `<id>.csv.gz`) or a file path (relative to the folder). Each trace starts at `start`;
    `sample(now)` returns the samples whose simulated time is in (previous now, now]."""

    def __init__(self, path: Path | str, mapping: Mapping[str, str], *, start: float = 0.0,
                 step: float = TRACE_STEP) -> None:
        self.path = Path(path)
        self.start = start
        self.errors: list[str] = []
        self.traces: dict[str, Trace] = {}
        loaded: dict[Path, dict[str, Trace]] = {}
        folder = self.path if self.path.is_dir() else self.path.parent
        for vm, ref in mapping.items():
            file, tid = self._locate(folder, str(ref))
            if file not in loaded:
                loaded[file] = read_trace(file, step)
            traces = loaded[file]
            trace = traces.get(tid) if tid is not None else (next(iter(traces.values())) if len(traces) == 1 else None)
            if trace is None:
                raise ValueError(f"no trace `{ref}` for `{vm}` in {file}")
            self.traces[vm] = trace
        self._last = -math.inf

    def _locate(self, folder: Path, ref: str) -> tuple[Path, str | None]:
        if self.path.is_file():
            if (folder / ref).is_file() and (folder / ref) != self.path:
                return folder / ref, None
            return self.path, ref
        for name in (ref, f"{ref}.csv", f"{ref}.csv.gz"):
            if (folder / name).is_file():
                return folder / name, None
        raise ValueError(f"no trace file `{ref}` in {folder}")

    @property
    def duration(self) -> float:
        """Simulated seconds until the longest trace ends."""
        return max((t.offsets[-1] for t in self.traces.values() if t.offsets), default=0.0)

    def sample(self, now: float) -> list[Sample]:
        lo, self._last = self._last, max(self._last, now)
        out: list[Sample] = []
        for vm, trace in self.traces.items():
            first = bisect.bisect_right(trace.offsets, lo - self.start) if lo > -math.inf else 0
            for i in range(first, bisect.bisect_right(trace.offsets, now - self.start)):
                t = self.start + trace.offsets[i]
                for metric, series in trace.values.items():
                    v = series[i]
                    if v is not None:
                        out.append(Sample(vm, metric, t, v))
        return out


# ------------------------------------------------------------------------------------------ the monitor


class SampleSink(Protocol):
    def append(self, samples: Iterable[tuple[str, str, float, float]]) -> int: ...


@dataclass(frozen=True)
class RoundResult:
    t: float
    samples: int  # stored this round
    vms: int  # VMs that gave at least one sample
    sampling_seconds: float  # every source's `sample`: the bulk call, deltas, queries
    storing_seconds: float
    errors: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    by_metric: dict[str, int] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.sampling_seconds + self.storing_seconds


class Monitor:
    """Samples its sources and stores the samples, once per `interval` seconds when the caller's loop
    says so: `round(now)` is one round; `due(now)` says whether the next one is due."""

    def __init__(self, source: Source | Sequence[Source], store: SampleSink, interval: float = 10.0) -> None:
        self.sources: tuple[Source, ...] = tuple(source) if isinstance(source, (list, tuple)) else (source,)
        self.store = store
        self.interval = interval
        self.last: float | None = None

    def due(self, now: float) -> bool:
        return self.last is None or now - self.last >= self.interval

    def round(self, now: float) -> RoundResult:
        t0 = time.perf_counter()
        samples: list[Sample] = []
        errors: list[str] = []
        notes: list[str] = []
        for src in self.sources:
            try:
                samples += src.sample(now)
            except Exception as e:  # a source's bug must not stop the others, nor the controller's loop
                errors.append(f"{type(src).__name__}: {type(e).__name__}: {e}")
            errors += getattr(src, "errors", [])
            notes += getattr(src, "notes", [])
        counts = dict(Counter(s[1] for s in samples))
        vms = len({s[0] for s in samples})
        t1 = time.perf_counter()
        stored = self.store.append(samples)
        t2 = time.perf_counter()
        self.last = now
        return RoundResult(now, stored, vms, t1 - t0, t2 - t1, tuple(errors), tuple(notes), counts)
