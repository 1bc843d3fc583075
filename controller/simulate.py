"""`vmflow simulate`: a program's morph rules replayed against recorded load, in simulated time.

The program is compiled and its VMs are created on a private hypervisor: libvirt's test driver on a node
file in a temporary state folder (never the user's `.vmflow`), through the planner and the Applier, as
`vmflow apply` creates them on the embedded default. A `Runtime` (controller/runtime.py) then runs the
controller's run-time loop over it with a simulated clock: each step takes the trace samples of its
interval from a `ReplaySource` (controller/monitor.py), appends them to the series, evaluates the rules
(controller/rules.py) and applies what fires or reverts through the same planner and Applier. Nothing is
mocked but time; the temporary folder, with its journal, series and events, is removed at the end.

What comes back is a `Simulation`: the timeline of morph outcomes with each VM's size after it, and a
summary (actions per VM, how long each rule's condition held, the peak size of each VM and pool against
its bound or capacity). `render_text` and `to_json` are its two renderings; specs/simulate.md describes
both and the JSON format.
"""

from __future__ import annotations

import csv
import gzip
import math
import re
import tempfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import click

from compiler import model as M
from compiler.graph import condition_text
from compiler.program import Compilation, Compiler
from compiler.units import format_bytes
from controller import embedded, rules
from controller.apply import Applier, ApplyRefused
from controller.context import make_plan, target
from controller.hypervisor import Hypervisor, HypervisorError
from controller.monitor import TRACE_STEP, ReplaySource, read_trace
from controller.rules import Limits, duration
from controller.state import VmState
from controller.store import Series, Store, series_path

FORMAT_VERSION = 1
# A sample stands for the gap before it (specs/morphs.md): a little more than the trace's step, so that a
# 5-minute trace covers `for 5m` windows, and a missing point (a hole in the trace) leaves a window unknown.
GAP_MARGIN = 1.1
ACTED = ("applied", "reverted", "rolled-back", "failed")
# A round costs about half a millisecond: 200,000 (two years of 5-minute samples) take a couple of minutes.
# More is a mistake (a year-long span at one-second rounds, a date typed wrong), refused rather than run.
MAX_ROUNDS = 200_000


class SimulateError(Exception):
    """The input cannot be simulated: a missing or unreadable trace, an unknown VM or trace id, a program
    whose VMs cannot be created. The message names the file, VM or trace."""


class ProgramInvalid(SimulateError):
    """The program does not compile; `compilation` holds the diagnostics."""

    def __init__(self, compilation: Compilation) -> None:
        super().__init__("the program does not validate")
        self.compilation = compilation


# ------------------------------------------------------------------------------------------ the result


@dataclass(frozen=True)
class Size:
    vcpus: int
    memory_kib: int
    image: str

    @staticmethod
    def of(vm: VmState) -> Size:
        return Size(vm.vcpus, vm.memory_kib, vm.image)

    def text(self) -> str:
        return f"{self.vcpus} vCPU {format_bytes(self.memory_kib * 1024)} {self.image}"

    def to_json(self) -> dict:
        return {"vcpus": self.vcpus, "memory_kib": self.memory_kib, "image": self.image}


@dataclass(frozen=True)
class Entry:
    """One morph outcome on the timeline, with the VM's size once the step was done."""

    at: float  # simulated Unix time
    offset: float  # seconds since the simulation started
    vm: str
    morph: str
    outcome: str
    reason: str
    size: Size | None
    detail: str | None = None


@dataclass
class VmSummary:
    name: str
    pool: str | None
    trace: str | None  # the trace id it replays, None without one
    trace_cores: int | None
    base: Size
    final: Size
    cpu_bound: int
    memory_bound_kib: int
    peak_vcpus: int
    peak_memory_kib: int
    outcomes: dict[str, int] = field(default_factory=dict)  # outcome -> how many

    @property
    def skipped(self) -> int:
        return sum(n for o, n in self.outcomes.items() if o.startswith("skipped-") or o == "paused")


@dataclass
class RuleSummary:
    """How long a rule's condition (and its `revert when`) held, evaluated at every step."""

    vm: str
    morph: str
    condition: str
    held: float  # simulated seconds
    known: float  # simulated seconds the condition was true or false (not unknown: no samples)
    revert: str | None = None
    revert_held: float = 0.0


@dataclass
class PoolSummary:
    name: str | None  # None: the VMs that name no pool
    cpu: int | None  # capacity; None when unlimited
    memory_kib: int | None
    peak_vcpus: int = 0
    peak_vcpus_at: float = 0.0
    peak_memory_kib: int = 0
    peak_memory_at: float = 0.0


@dataclass
class Simulation:
    program: str  # the program's name (its folder)
    path: str  # as given
    trace: str  # as given
    start: float
    end: float
    interval: float
    max_gap: float
    mapping: dict[str, str]  # vm -> trace id
    timeline: list[Entry]
    vms: list[VmSummary]
    rules: list[RuleSummary]
    pools: list[PoolSummary]
    notes: list[str]
    steps: int

    @property
    def duration(self) -> float:
        return self.end - self.start


# ------------------------------------------------------------------------------------------ inputs


def parse_map(items: Iterable[str]) -> dict[str, str]:
    """`VM=TRACE_ID` pairs; ValueError names a malformed one or a VM given twice."""
    out: dict[str, str] = {}
    for item in items:
        vm, sep, ref = item.partition("=")
        vm, ref = vm.strip(), ref.strip()
        if not sep or not vm or not ref:
            raise ValueError(f"`{item}` is not VM=TRACE_ID")
        if vm in out and out[vm] != ref:
            raise ValueError(f"`{vm}` is mapped twice ({out[vm]}, {ref})")
        out[vm] = ref
    return out


def parse_time(text: str) -> float | datetime:
    """`--start` / `--end`: a duration from the trace's start (`2h`, `3d12h`, `90m`) or a UTC date and time
    (`2013-08-05`, `2013-08-05T14:00`). ValueError otherwise."""
    t = text.strip()
    try:
        when = datetime.fromisoformat(t.removesuffix("Z").removesuffix("z"))
        return when if when.tzinfo else when.replace(tzinfo=UTC)
    except ValueError:
        pass
    seconds = _duration(t)
    if seconds is None:
        shown = text if len(text) <= 40 else text[:40] + "…"
        raise ValueError(f"`{shown}` is neither a duration (`2h`, `1d12h`) nor a date (`2013-08-05T14:00`)")
    return seconds


def _duration(text: str) -> float | None:
    """`1d12h30m`, `90s`, `1.5h`: a sum of numbers with d/h/m/s units; None if it is not one."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([dhms])", text)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([dhms])", "", text).strip():
        return None
    seconds = sum(float(n) * {"d": 86400, "h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    return seconds if math.isfinite(seconds) else None  # four hundred nines are not a duration


def _trace_starts(source: ReplaySource, files: Mapping[str, Path], stamps: Mapping[Path, dict[str, float]]
                  ) -> dict[str, float]:
    """Each mapped VM's trace start (its first `timestamp_s`): the replay puts every trace at one simulated
    start, and this is the time the timeline shows. `files` is each VM's trace file and `stamps` each file's
    first stamps by trace id, as `check_trace` read them."""
    out: dict[str, float] = {}
    for vm, trace in source.traces.items():
        first = stamps.get(files.get(vm), {})
        tid = trace.source.removeprefix(f"{files.get(vm)}:")
        if tid in first:
            out[vm] = first[tid]
    return out


# What a trace may hold. The file is read whole into memory by the replay (about twenty times its size),
# so it is bounded; a line is bounded so that a file without newlines is not one huge read.
MAX_TRACE_BYTES = 64 * 1024 * 1024
MAX_LINE_CHARS = 64 * 1024
MAX_CORES = 1 << 20
# Unix seconds that are dates (years 1 to 9999 in UTC, which is how times are shown).
EARLIEST, LATEST = -62135596800.0, 253402300799.0
TRACE_COLUMNS = ("timestamp_s", "cpu_cores", "cpu_capacity_mhz", "cpu_usage_mhz", "mem_capacity_kb", "mem_usage_kb",
                 "disk_read_kbps", "disk_write_kbps", "net_rx_kbps", "net_tx_kbps")
_VALUE_COLUMNS = TRACE_COLUMNS[2:]
_RATIOS = (("cpu_usage_mhz", "cpu_capacity_mhz"), ("mem_usage_kb", "mem_capacity_kb"))


def trace_files(trace: Path, mapping: Mapping[str, str]) -> dict[str, Path]:
    """The file each VM's trace is read from, as ReplaySource finds it (a VM whose file is not there is
    left out: the replay says so)."""
    out: dict[str, Path] = {}
    folder = trace if trace.is_dir() else trace.parent
    for vm, ref in mapping.items():
        if trace.is_file():
            out[vm] = folder / ref if (folder / ref).is_file() and (folder / ref) != trace else trace
            continue
        found = next((folder / n for n in (ref, f"{ref}.csv", f"{ref}.csv.gz") if (folder / n).is_file()), None)
        if found is not None:
            out[vm] = found
    return out


def check_trace(path: Path) -> dict[str, float]:
    """Read a trace file once, streaming, before the replay loads it: each trace id's first `timestamp_s`,
    or a SimulateError saying what is wrong and where (`file:line:column`). A trace is refused when it is
    empty, larger than MAX_TRACE_BYTES once decompressed, not UTF-8 CSV, without a `timestamp_s` column or
    any metric column, or when a row's time is not a date in Unix seconds, or a value is not a number, is
    negative or infinite. An empty or `nan` value is a missing sample (a hole), as in the recorded traces."""
    opener = gzip.open if path.suffix == ".gz" else open
    default = path.name.split(".")[0]
    first: dict[str, float] = {}
    line = 0
    try:
        with opener(path, "rt", newline="", encoding="utf-8") as f:
            reader = csv.reader(_bounded_lines(f, path))
            header = next(reader, None)
            if header is None:
                raise SimulateError(f"the trace `{path}` is empty: a trace is a CSV file whose first line names "
                                    f"its columns ({', '.join(TRACE_COLUMNS)})")
            if "timestamp_s" not in header:
                raise SimulateError(f"{path}:1:1: the trace has no `timestamp_s` column (its columns: "
                                    f"{_listed([f'`{h}`' for h in header])}; a trace has {', '.join(TRACE_COLUMNS)})")
            if not any(c in header for c in _VALUE_COLUMNS):
                raise SimulateError(f"{path}:1:1: the trace has no metric column (its columns: "
                                    f"{_listed([f'`{h}`' for h in header])}; a trace has {', '.join(_VALUE_COLUMNS)})")
            at = {name: i for i, name in enumerate(header)}
            for row in reader:
                line = reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                t = _cell(path, line, row, at, "timestamp_s", hole=False)
                if not EARLIEST <= t <= LATEST:
                    raise SimulateError(f"{_where(path, line, row, at['timestamp_s'])}: `timestamp_s` {t:g} is not a "
                                        "time: Unix seconds between the years 1 and 9999 are")
                cores = _cell(path, line, row, at, "cpu_cores")
                if cores is not None and cores > MAX_CORES:
                    raise SimulateError(f"{_where(path, line, row, at['cpu_cores'])}: `cpu_cores` {cores:g} is more "
                                        f"than any machine has (at most {MAX_CORES:,})")
                values = {c: _cell(path, line, row, at, c) for c in _VALUE_COLUMNS}
                for usage, capacity in _RATIOS:
                    u, c = values[usage], values[capacity]
                    if u is not None and c and not math.isfinite(u / c * 100.0):
                        raise SimulateError(f"{_where(path, line, row, at[usage])}: `{usage}` {u:g} over "
                                            f"`{capacity}` {c:g} is not a finite percentage")
                tid = (row[at["trace_id"]] if "trace_id" in at and at["trace_id"] < len(row) else "") or default
                if t < first.get(tid, math.inf):
                    first[tid] = t
    except UnicodeDecodeError as e:
        raise SimulateError(f"cannot read the trace `{path}`: it is not UTF-8 text (byte {e.start} of line "
                            f"{line + 1})") from None
    except csv.Error as e:
        raise SimulateError(f"{path}:{line + 1}: not CSV: {e}") from None
    except (OSError, EOFError, zlib.error) as e:
        raise SimulateError(f"cannot read the trace `{path}`: {e}") from None
    return first


def _bounded_lines(f, path: Path):
    """The file's lines, with SimulateError past MAX_LINE_CHARS in one line or MAX_TRACE_BYTES in all."""
    total, number = 0, 0
    while True:
        text = f.readline(MAX_LINE_CHARS + 1)
        if not text:
            return
        number += 1
        total += len(text)
        if len(text) > MAX_LINE_CHARS:
            raise SimulateError(f"{path}:{number}:1: a line longer than {MAX_LINE_CHARS:,} characters: not a trace")
        if total > MAX_TRACE_BYTES:
            raise SimulateError(f"the trace `{path}` is larger than {format_bytes(MAX_TRACE_BYTES)} (once "
                                "decompressed): split it into a folder of one file per trace, and map each")
        yield text


def _where(path: Path, line: int, row: list[str], index: int) -> str:
    """`file:line:column` of a row's cell (the column counted as written, without quotes)."""
    return f"{path}:{line}:{1 + sum(len(c) + 1 for c in row[:index])}"


def _cell(path: Path, line: int, row: list[str], at: Mapping[str, int], column: str, hole: bool = True
          ) -> float | None:
    """A cell as a finite number at least 0 (any for `timestamp_s`), None for a hole (empty, `nan`, or a
    column the file lacks); SimulateError for anything else."""
    i = at.get(column)
    text = row[i].strip() if i is not None and i < len(row) else ""
    if not text or (hole and text.lower() == "nan"):
        if hole:
            return None
        raise SimulateError(f"{_where(path, line, row, i if i is not None and i < len(row) else len(row))}: "
                            f"`{column}` is empty: every row needs its time")
    try:
        value = float(text)
    except ValueError:
        shown = text if len(text) <= 40 else text[:40] + "…"
        raise SimulateError(f"{_where(path, line, row, i)}: `{column}` is `{shown}`, not a number") from None
    if not math.isfinite(value):
        raise SimulateError(f"{_where(path, line, row, i)}: `{column}` is `{text}`, not a finite number")
    if value < 0 and column != "timestamp_s":
        raise SimulateError(f"{_where(path, line, row, i)}: `{column}` is {text}: a recorded amount cannot be "
                            "negative")
    return value


def _trace_ids(path: Path) -> list[str]:
    """What a trace file or folder offers to --map, for an error message."""
    try:
        if path.is_dir():
            return sorted({p.name.split(".")[0] for p in path.iterdir() if p.name.endswith((".csv", ".csv.gz"))})
        return sorted(read_trace(path))
    except (OSError, csv.Error, UnicodeDecodeError, EOFError):
        return []


def _listed(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


def open_replay(trace: Path, mapping: Mapping[str, str], step: float = TRACE_STEP) -> ReplaySource:
    """The replay of `trace` for `mapping`, or a SimulateError naming the file or trace id at fault."""
    if not trace.exists():
        raise SimulateError(f"the trace `{trace}` does not exist")
    try:
        return ReplaySource(trace, mapping, step=step)
    except UnicodeDecodeError as e:  # a ValueError too, but a file's fault, not a missing id's
        raise SimulateError(f"cannot read the trace `{trace}`: it is not UTF-8 text ({e.reason})") from None
    except ValueError as e:
        ids = _trace_ids(trace)
        raise SimulateError(f"{e}" + (f" (it has: {_listed(ids)})" if ids else "")) from None
    except (OSError, csv.Error, EOFError, zlib.error) as e:
        raise SimulateError(f"cannot read the trace `{trace}`: {e}") from None


# ------------------------------------------------------------------------------------------ simulating


def simulate(program_path: Path | str, trace: Path | str, mapping: Mapping[str, str], *,
             start: float | datetime | None = None, end: float | datetime | None = None,
             interval: float | None = None, limits: Limits = Limits(), images: Sequence[Path] = (),  # noqa: B008
             compiler: Compiler | None = None) -> Simulation:
    """Replay `trace` against the program at `program_path` and return what its morphs did.

    `mapping` gives VMs their traces (`{vm: trace id or file}`); the others get no samples. `start` and
    `end` are seconds from the trace's start or absolute times (default: the whole trace); `interval`
    is the simulated seconds between rule rounds (default: the trace's step, 5 minutes)."""
    program_path, trace = Path(program_path), Path(trace)
    if not program_path.exists():
        raise SimulateError(f"the program `{program_path}` does not exist")
    if interval is not None and not interval > 0:
        raise SimulateError(f"the interval must be positive, not {interval:g}")
    comp = (compiler or Compiler(images=list(images))).compile_path(program_path)
    if not comp.ok:
        raise ProgramInvalid(comp)
    program = comp.program
    unknown = sorted(set(mapping) - set(program.vms))
    if unknown:
        raise SimulateError(f"--map names `{unknown[0]}`, which is not a VM of `{program_path}` "
                            f"(its VMs: {_listed(sorted(program.vms))})")
    if not mapping:
        raise SimulateError("no VM has a trace: map one with --map VM=TRACE_ID")
    step = TRACE_STEP
    interval = float(interval or step)
    if not trace.exists():
        raise SimulateError(f"the trace `{trace}` does not exist")
    files = trace_files(trace, mapping)
    stamps = {f: check_trace(f) for f in sorted(set(files.values()))}
    for f, first in stamps.items():
        if not first:
            raise SimulateError(f"the trace `{f}` holds no samples: it has its header line and no rows")
    source = open_replay(trace, mapping, step=step)
    starts = _trace_starts(source, files, stamps)
    if not any(t.offsets for t in source.traces.values()):
        raise SimulateError(f"the traces {', '.join(f'`{r}`' for r in sorted(set(mapping.values())))} in "
                            f"`{trace}` hold no samples")
    # The replay runs on the traces' own clock, known once they are read: the timeline shows real dates.
    t0 = min(starts.values(), default=0.0)
    source.start = t0
    sim_start = _at(start, t0, t0)
    sim_end = _at(end, t0, t0 + source.duration)
    for name, value, at in (("start", start, sim_start), ("end", end, sim_end)):
        if not EARLIEST <= at <= LATEST:
            given = f"--{name} {_given(value)} puts" if value is not None else "the trace puts"
            raise SimulateError(f"{given} the simulation's {name} at {at:.6g} s, which is not a time: Unix seconds "
                                "between the years 1 and 9999 are")
    if sim_end < sim_start:
        raise SimulateError(f"the simulation would end ({_iso(sim_end)}) before it starts ({_iso(sim_start)})")
    rounds = math.floor((sim_end - sim_start) / interval + 1e-9) + 1
    if rounds > MAX_ROUNDS:
        raise SimulateError(f"the simulation would take {rounds:,} rounds ({duration(round(sim_end - sim_start))}, "
                            f"a round every {duration(interval)}); at most {MAX_ROUNDS:,} are run: shorten it with "
                            "--start and --end, or give a longer --interval")
    max_gap = step * GAP_MARGIN

    with tempfile.TemporaryDirectory(prefix="vmflow-simulate-") as tmp:
        state_dir = Path(tmp)
        run = _Run(comp, program_path, state_dir, source, mapping, limits, interval, max_gap)
        try:
            return run.go(sim_start, sim_end, trace, starts)
        finally:
            run.close()


def _given(value: float | datetime) -> str:
    return value.isoformat() if isinstance(value, datetime) else duration(round(value)) if value < 1e15 else f"{value:g}s"


def _at(value: float | datetime | None, t0: float, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, datetime):
        return value.timestamp()
    return t0 + float(value)


class _Run:
    """One simulation's private world: hypervisor, store, series and runtime in a temporary folder."""

    def __init__(self, comp: Compilation, path: Path, state_dir: Path, source: ReplaySource,
                 mapping: Mapping[str, str], limits: Limits, interval: float, max_gap: float) -> None:
        self.comp = comp
        self.program: M.Program = comp.program
        self.path = path
        self.source = source
        self.mapping = dict(mapping)
        self.interval = interval
        self.max_gap = max_gap
        program_dir = path.resolve() if path.is_dir() else path.resolve().parent
        # The private node file is named explicitly: a pool naming a real host must not be reached.
        self.target = target(comp, program_dir.name, program_dir, embedded.uri(state_dir), state_dir)
        self.hv = Hypervisor(self.target.uri)
        self.store = Store(state_dir / "vmflow.db")
        lookback = max((_lookback(vm, max_gap) for vm in self.program.vms.values()), default=0.0)
        # The rules read the recent window, kept in memory; a day per bucket spares the store a rollup of
        # every metric at every 5-minute step (the rollups are for month-long queries, which nothing asks).
        self.series = Series(series_path(state_dir), recent_seconds=max(3600.0, lookback + 2 * max_gap),
                             bucket_seconds=86400.0)
        self.now = 0.0
        self.limits = limits

    def _start(self) -> None:
        """The program's VMs at their base, then the run-time loop over them."""
        from controller.runtime import Runtime

        self._create()
        # Every change in the caller's thread (`workers="none"`): an OS swap then ends in the round that
        # started it, and the timeline does not depend on how fast a worker thread runs.
        self.runtime = Runtime(self.target.program, self.hv, self.store, self.series, limits=self.limits,
                               interval=self.interval, stability=0.0, clock=lambda: self.now, sleep=lambda _s: None,
                               saved=lambda: None, images=None, health=self.target.health, record_skips=True,
                               workers="none", max_gap=self.max_gap)
        self.runtime.load(self.program)

    def close(self) -> None:
        self.series.close()
        self.store.close()
        self.hv.close()

    def _create(self) -> None:
        """The program's VMs at their base, as `vmflow apply` creates them."""
        try:
            plan, _actual = make_plan(self.target, self.hv)
            if not plan.applyable:
                raise SimulateError("the program's VMs cannot be created: " +
                                    "; ".join(f"{p.address}: {p.message}" for p in plan.problems))
            result = Applier(self.hv, self.store, health=self.target.health).apply(plan, self.target.program)
        except (ApplyRefused, HypervisorError) as e:
            raise SimulateError(f"the program's VMs cannot be created: {e}") from None
        if not result.ok:
            bad = next(o for o in result.outcomes if o.result != "applied")
            raise SimulateError(f"the program's VMs cannot be created: {bad.address}: {bad.result}: {bad.detail}")

    def go(self, start: float, end: float, trace: Path, trace_starts: Mapping[str, float]) -> Simulation:
        self._start()
        program = self.program
        states = {n: self.hv.observe_vm(n) for n in sorted(program.vms)}
        base = {n: Size.of(s) for n, s in states.items() if s is not None}
        vm_sums = {n: VmSummary(n, self._pool_of(n), self.mapping.get(n),
                                self.source.traces[n].cores if n in self.source.traces else None,
                                base[n], base[n], program.vms[n].cpu.bound, program.vms[n].memory.bound // 1024,
                                base[n].vcpus, base[n].memory_kib) for n in base}
        pools = self._pools()
        self._peaks(pools, states, start)
        rule_sums = [RuleSummary(n, m.name, condition_text(m.condition), 0.0, 0.0,
                                 condition_text(m.revert) if m.revert is not None else None)
                     for n, vm in sorted(program.vms.items()) for m in vm.morphs]
        lookbacks = {n: _lookback_map(vm, self.max_gap) for n, vm in program.vms.items()}
        timeline: list[Entry] = []
        # Samples before the start are history: what the rules may look back at in the first step.
        longest = max(max(lb.values(), default=0.0) for lb in lookbacks.values()) if lookbacks else 0.0
        self.source.sample(start - self.interval - longest)
        n_steps = math.floor((end - start) / self.interval + 1e-9) + 1
        for k in range(n_steps):
            now = self.now = start + k * self.interval
            outcomes = self.runtime.step(now, self.source.sample(now))
            touched = {o.vm for o in outcomes if o.outcome in ACTED}
            for name in touched:
                states[name] = self.hv.observe_vm(name)
            if touched:
                self._peaks(pools, states, now)
                for name in touched:
                    s = states[name]
                    if s is not None and name in vm_sums:
                        v = vm_sums[name]
                        v.peak_vcpus = max(v.peak_vcpus, s.vcpus)
                        v.peak_memory_kib = max(v.peak_memory_kib, s.memory_kib)
            for o in outcomes:
                if o.outcome == "fired":
                    continue  # its result (applied, rolled back, failed) follows in the same round
                s = states.get(o.vm)
                timeline.append(Entry(now, now - start, o.vm, o.morph, o.outcome, o.reason,
                                      Size.of(s) if s is not None else None, o.detail))
                if o.vm in vm_sums:
                    c = vm_sums[o.vm].outcomes
                    c[o.outcome] = c.get(o.outcome, 0) + 1
            if k:  # each round stands for the interval before it
                self._conditions(rule_sums, lookbacks, now)
        for name, v in vm_sums.items():
            s = states.get(name)
            if s is not None:
                v.final = Size.of(s)
        notes = self._notes(trace_starts)
        return Simulation(self.target.program, str(self.path), str(trace), start, end, self.interval,
                          self.max_gap, dict(sorted(self.mapping.items())), timeline, list(vm_sums.values()),
                          rule_sums, list(pools.values()), notes, n_steps)

    def _pool_of(self, vm: str) -> str | None:
        """The pool a VM counts against: its own, else the program's only pool (as the compiler's capacity
        check and the run-time loop count it)."""
        pool = self.program.vms[vm].pool
        if pool is None and len(self.program.pools) == 1:
            pool = next(iter(self.program.pools))
        return pool

    def _pools(self) -> dict[str | None, PoolSummary]:
        out: dict[str | None, PoolSummary] = {}
        for pool in sorted({self._pool_of(n) for n in self.program.vms}, key=lambda p: (p is None, p or "")):
            spec = self.program.pools.get(pool) if pool else None
            out[pool] = PoolSummary(pool, spec.cpu if spec else None,
                                    spec.memory // 1024 if spec and spec.memory else None)
        return out

    def _peaks(self, pools: dict[str | None, PoolSummary], states: Mapping[str, VmState | None], now: float) -> None:
        for p in pools.values():
            members = [s for n, s in states.items() if s is not None and self._pool_of(n) == p.name]
            cpu, mem = sum(s.vcpus for s in members), sum(s.memory_kib for s in members)
            if cpu > p.peak_vcpus:
                p.peak_vcpus, p.peak_vcpus_at = cpu, now
            if mem > p.peak_memory_kib:
                p.peak_memory_kib, p.peak_memory_at = mem, now

    def _conditions(self, sums: list[RuleSummary], lookbacks: Mapping[str, dict[str, float]], now: float) -> None:
        """Each rule's condition at `now`, as the engine evaluates it, over the same series."""
        by_vm: dict[str, rules._Samples] = {}
        for r in sums:
            if r.vm not in self.mapping:
                continue
            samples = by_vm.get(r.vm)
            if samples is None:
                samples = by_vm[r.vm] = rules._Samples(self.series, r.vm, now, self.max_gap, lookbacks[r.vm])
            morph = next(m for m in self.program.vms[r.vm].morphs if m.name == r.morph)
            held = rules.evaluate_condition(morph.condition, samples, now)
            if held is not None:
                r.known += self.interval
            if held:
                r.held += self.interval
            if morph.revert is not None and rules.evaluate_condition(morph.revert, samples, now):
                r.revert_held += self.interval

    def _notes(self, trace_starts: Mapping[str, float]) -> list[str]:
        notes = []
        with_rules = [n for n, vm in sorted(self.program.vms.items()) if vm.morphs]
        for n in with_rules:
            if n not in self.mapping:
                notes.append(f"`{n}` has no trace (no --map {n}=TRACE_ID): no samples, its rules never act")
        if len({round(t) for t in trace_starts.values()}) > 1:
            notes.append("the traces start at different times; each is replayed from the simulation's start")
        for n, tr in sorted(self.source.traces.items()):
            if not tr.offsets:
                notes.append(f"the trace of `{n}` holds no samples")
        notes.append("the traces are replayed as recorded: a VM that grows does not see its CPU or memory "
                     "figures fall")
        return notes


def _lookback_map(vm: M.VmSpec, gap: float) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in vm.morphs:
        rules.lookback(m.condition, gap, out)
        rules.lookback(m.revert, gap, out)
    return out


def _lookback(vm: M.VmSpec, gap: float) -> float:
    return max(_lookback_map(vm, gap).values(), default=0.0)


# ------------------------------------------------------------------------------------------ rendering


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _offset(seconds: float) -> str:
    return "+" + duration(round(seconds))


def _share(part: float, whole: float | None) -> str:
    if not whole:
        return ""
    return f" ({part / whole * 100:.0f}%)"


def to_json(sims: Sequence[Simulation]) -> dict:
    """The JSON document of specs/simulate.md."""
    return {"format_version": FORMAT_VERSION, "simulations": [_sim_json(s) for s in sims]}


def _sim_json(s: Simulation) -> dict:
    return {
        "program": s.program,
        "path": s.path,
        "trace": s.trace,
        "start": _iso(s.start), "start_s": s.start,
        "end": _iso(s.end), "end_s": s.end,
        "duration_s": s.duration,
        "interval_s": s.interval,
        "max_gap_s": s.max_gap,
        "steps": s.steps,
        "mapping": s.mapping,
        "timeline": [{"at": _iso(e.at), "at_s": e.at, "offset_s": e.offset, "vm": e.vm, "morph": e.morph,
                      "outcome": e.outcome, "reason": e.reason, "detail": e.detail,
                      "size": e.size.to_json() if e.size else None} for e in s.timeline],
        "vms": [{"name": v.name, "pool": v.pool, "trace": v.trace, "trace_cores": v.trace_cores,
                 "base": v.base.to_json(), "final": v.final.to_json(),
                 "bounds": {"vcpus": v.cpu_bound, "memory_kib": v.memory_bound_kib},
                 "peak": {"vcpus": v.peak_vcpus, "memory_kib": v.peak_memory_kib},
                 "applied": v.outcomes.get("applied", 0), "reverted": v.outcomes.get("reverted", 0),
                 "skipped": v.skipped, "rolled_back": v.outcomes.get("rolled-back", 0),
                 "failed": v.outcomes.get("failed", 0), "outcomes": dict(sorted(v.outcomes.items()))}
                for v in s.vms],
        "rules": [{"vm": r.vm, "morph": r.morph, "condition": r.condition, "held_s": r.held, "known_s": r.known,
                   "revert": None if r.revert is None else {"condition": r.revert, "held_s": r.revert_held}}
                  for r in s.rules],
        "pools": [{"name": p.name, "capacity": {"vcpus": p.cpu, "memory_kib": p.memory_kib},
                   "peak": {"vcpus": p.peak_vcpus, "vcpus_at": _iso(p.peak_vcpus_at),
                            "memory_kib": p.peak_memory_kib, "memory_at": _iso(p.peak_memory_at)}}
                  for p in s.pools],
        "notes": s.notes,
    }


_COLOURS = {"applied": "green", "reverted": "cyan", "fired": "green", "rolled-back": "red", "failed": "red"}


def _table(rows: list[list[str]], colour: bool, styles: Sequence[str | None] = (), styled: int = 0) -> list[str]:
    """Left-aligned columns two spaces apart, the header row bold; the last column is not padded (it may be
    long). With colour, column `styled` of data row i takes the colour `styles[i]`."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    out = []
    for i, row in enumerate(rows):
        cells = [c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]
        if colour and i == 0:
            cells = [click.style(c, bold=True) for c in cells]
        elif colour and styles and styles[i - 1]:
            cells[styled] = click.style(cells[styled], fg=styles[i - 1])
        out.append(("  " + "  ".join(cells)).rstrip())
    return out


def render_text(sims: Sequence[Simulation], colour: bool = False) -> str:
    lines: list[str] = []
    for i, s in enumerate(sims):
        if i:
            lines.append("")
        lines += _render_one(s, colour)
    return "\n".join(lines) + "\n"


def _render_one(s: Simulation, colour: bool) -> list[str]:
    bold = (lambda t: click.style(t, bold=True)) if colour else (lambda t: t)
    lines = [bold(f"Simulation of {s.path} against {s.trace}"),
             (f"  {_iso(s.start)} to {_iso(s.end)} ({duration(round(s.duration))}), a round every "
              f"{duration(round(s.interval))}; a sample stands for up to {duration(round(s.max_gap))}")]
    traced = [f"{v.name} ← {v.trace}" + (f" (recorded on {v.trace_cores} cores)" if v.trace_cores else "")
              for v in s.vms if v.trace]
    lines.append(f"  traces: {', '.join(traced) if traced else 'none'}")
    for note in s.notes:
        lines.append(f"  note: {note}")

    lines += ["", bold("Timeline")]
    if s.timeline:
        rows = [["TIME", "AFTER", "VM", "MORPH", "OUTCOME", "SIZE", "WHY"]]
        styles: list[str | None] = []
        # A rule held back the same way again and again (at its bound through a long busy spell) is one
        # line and a count, not a screenful; the JSON keeps every event.
        last: dict[tuple[str, str], str] = {}
        runs: dict[tuple[str, str], list] = {}

        def flush(key: tuple[str, str]) -> None:
            run = runs.pop(key, None)
            if run:
                n, outcome, first, final = run
                rows.append(["…", "", key[0], key[1], f"{n} × {outcome}", "",
                             f"again each time the condition held, {_iso(first)} to {_iso(final)}"])
                styles.append(_COLOURS.get(outcome, "yellow"))

        for e in s.timeline:
            key = (e.vm, e.morph)
            if e.outcome.startswith("skipped-") and last.get(key) == e.outcome:
                run = runs.setdefault(key, [0, e.outcome, e.at, e.at])
                run[0] += 1
                run[3] = e.at
                continue
            flush(key)
            last[key] = e.outcome
            why = e.reason + (f" ({e.detail})" if e.detail else "")
            rows.append([_iso(e.at), _offset(e.offset), e.vm, e.morph, e.outcome, e.size.text() if e.size else "-",
                         why])
            styles.append(_COLOURS.get(e.outcome, "yellow"))
        for key in list(runs):
            flush(key)
        lines += _table(rows, colour, styles, styled=4)
    else:
        lines.append("  no morph acted or was held back")

    lines += ["", bold("Morphs per VM")]
    rows = [["VM", "TRACE", "APPLIED", "REVERTED", "SKIPPED", "FAILED", "BASE", "FINAL"]]
    for v in s.vms:
        failed = v.outcomes.get("failed", 0) + v.outcomes.get("rolled-back", 0)
        skipped = _skips(v.outcomes)
        rows.append([v.name, v.trace or "-", str(v.outcomes.get("applied", 0)), str(v.outcomes.get("reverted", 0)),
                     skipped, str(failed), v.base.text(), v.final.text()])
    lines += _table(rows, colour)

    if s.rules:
        lines += ["", bold("Time the rules' conditions held")]
        rows = [["VM", "MORPH", "HELD", "CONDITION"]]
        for r in s.rules:
            if r.vm not in s.mapping:
                rows.append([r.vm, r.morph, "no data", r.condition])
                continue
            rows.append([r.vm, r.morph, duration(round(r.held)) + _share(r.held, s.duration), r.condition])
            if r.revert is not None:
                rows.append(["", "", duration(round(r.revert_held)) + _share(r.revert_held, s.duration),
                             f"revert when {r.revert}"])
        lines += _table(rows, colour)

    lines += ["", bold("Capacity")]
    rows = [["POOL", "PEAK vCPU", "AT", "PEAK MEMORY", "AT"]]
    for p in s.pools:
        rows.append([p.name or "(no pool)", _peak(p.peak_vcpus, p.cpu, str), _offset(p.peak_vcpus_at - s.start),
                     _peak(p.peak_memory_kib, p.memory_kib, _kib), _offset(p.peak_memory_at - s.start)])
    lines += _table(rows, colour)
    lines.append("")
    rows = [["VM", "PEAK vCPU", "PEAK MEMORY", "POOL"]]
    for v in s.vms:
        rows.append([v.name, _peak(v.peak_vcpus, v.cpu_bound, str), _peak(v.peak_memory_kib, v.memory_bound_kib, _kib),
                     v.pool or "-"])
    lines += _table(rows, colour)
    return lines


def _skips(outcomes: Mapping[str, int]) -> str:
    """`2 cooldown, 1 bound`: the held-back actions by reason; `-` for none."""
    held = [f"{n} {o.removeprefix('skipped-')}" for o, n in sorted(outcomes.items())
            if o.startswith("skipped-") or o == "paused"]
    return ", ".join(held) or "-"


def _kib(k: int) -> str:
    return format_bytes(k * 1024)


def _peak(value: int, limit: int | None, fmt) -> str:
    if limit is None:
        return f"{fmt(value)} (no limit)"
    return f"{fmt(value)} of {fmt(limit)}{_share(value, limit)}"

