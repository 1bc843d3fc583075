"""The rule engine: when morphs fire and revert.

Called once per sample round with the time, the program's VMs, their observed states and a source of
samples, it evaluates every morph's condition (`cpu > 80% for 5m`, `avg(cpu, 10m)`, `forecast(cpu, 15m)`,
`app("x") running`, `and`/`or`/`not`) and returns `Decision`s: a morph fires or reverts, with the state to
apply (computed by controller/morph.py), or it is due but held back, and the decision says why (cooldown,
the hourly rate, its bound, the pool's capacity, the fleet's concurrency, a VM already being changed).

Pure: no libvirt, no database, no clock. Time is an argument and the samples come through `Series`, so
`vmflow simulate` runs the same engine in simulated time. What the engine remembers between rounds
(cooldowns, hysteresis, the hourly count) is a small state that `state()` and `restore()` carry as JSON
across a controller restart. specs/morphs.md states the semantics.
"""

from __future__ import annotations

import bisect
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from compiler import model as M
from compiler.units import Dimension
from controller import morph as morphs
from controller.state import VmState

# Metric names as conditions write them → as the sample source names them.
SERIES_METRIC: dict[str, str] = {
    "cpu": "cpu",
    "memory": "memory",
    "disk.read": "disk_read",
    "disk.write": "disk_write",
    "net.rx": "net_rx",
    "net.tx": "net_tx",
}

DEFAULT_COOLDOWN = 300.0  # seconds, for a morph that declares none (the compiler warns: F320)
DEFAULT_MAX_GAP = 15.0  # seconds: the longest stretch without a sample a window may have
RATE_WINDOW = 3600.0  # the hourly rate limit counts actions in (now - RATE_WINDOW, now]
STATE_VERSION = 1
_EPS = 1e-6  # sample times are floats: a sample "at" a window's edge may be off by rounding

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, "<": operator.lt, ">=": operator.ge, "<=": operator.le, "==": operator.eq,
    "!=": operator.ne,
}


class Series(Protocol):
    """Where the engine reads samples from (the monitor's time-series store, or a simulation)."""

    def window(self, vm: str, metric: str, start: float, end: float) -> list[tuple[float, float]]:
        """Samples `(time, value)` of `metric` (a `SERIES_METRIC` value) with start <= time <= end, in time
        order. Percent (0..100) for cpu and memory, bytes per second for the others."""

    def app(self, vm: str, name: str) -> str | None:
        """The state of an application in the guest (`"running"`, `"stopped"`...), None when unknown."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_morphs_per_vm_per_hour: int = 6  # fires and reverts of one VM in any hour
    fleet_concurrency: int = 4  # VMs being morphed at once: this round's actions plus the busy ones


class Kind(str, Enum):
    FIRE = "fire"
    REVERT = "revert"
    SKIP = "skip"


class Outcome(str, Enum):
    FIRED = "fired"
    REVERTED = "reverted"
    SKIPPED_COOLDOWN = "skipped-cooldown"
    SKIPPED_RATE = "skipped-rate"
    SKIPPED_BOUND = "skipped-bound"
    SKIPPED_CAPACITY = "skipped-capacity"
    SKIPPED_CONCURRENCY = "skipped-concurrency"
    PAUSED = "paused"


@dataclass(frozen=True, slots=True)
class Decision:
    """One rule's outcome in one round. `kind` is `fire` or `revert` when the morph acts (and `target` is
    the state to apply), `skip` when it was due and held back; `intent` says which of the two was due."""

    at: float
    vm: str
    morph: str
    kind: Kind
    outcome: Outcome
    reason: str  # human: "cpu 91.2% > 80% for 30s: cpu 2 → 4"
    target: VmState | None = None
    intent: Kind = Kind.FIRE


# ------------------------------------------------------------------------------------------ samples


class _Samples:
    """One VM's samples for one round: each metric fetched once, over the longest window any of the VM's
    rules needs, then sliced; function values are memoised by (function, time)."""

    __slots__ = ("data", "gap", "lookback", "memo", "now", "series", "vm")

    def __init__(self, series: Series, vm: str, now: float, gap: float, lookback: Mapping[str, float]) -> None:
        self.series = series
        self.vm = vm
        self.now = now
        self.gap = gap
        self.lookback = lookback
        self.data: dict[str, tuple[list[float], list[float]]] = {}
        self.memo: dict[tuple, float | None] = {}

    def get(self, metric: str) -> tuple[list[float], list[float]]:
        got = self.data.get(metric)
        if got is None:
            back = self.lookback.get(metric, self.gap)
            rows = sorted(self.series.window(self.vm, SERIES_METRIC[metric], self.now - back, self.now))
            got = (list(map(_first, rows)), list(map(_second, rows))) if rows else ([], [])
            self.data[metric] = got
        return got

    def span(self, metric: str, start: float, end: float) -> tuple[list[float], list[float]]:
        """The samples in the window (start, end]: open at the start, because the sample at the start
        stands for the interval before the window. So `for 30s` at a 10 s interval needs the three
        samples at t-20, t-10 and t, and a rule reacts within its window plus one interval."""
        times, values = self.get(metric)
        i = bisect.bisect_right(times, start + _EPS)
        j = bisect.bisect_right(times, end + _EPS)
        return times[i:j], values[i:j]

    def latest(self, metric: str, at: float) -> float | None:
        """The metric's value at `at`: the last sample at or before it, if no older than the gap."""
        times, values = self.get(metric)
        j = bisect.bisect_right(times, at + _EPS)
        if j == 0 or at - times[j - 1] > self.gap + _EPS:
            return None
        return values[j - 1]


_first = operator.itemgetter(0)
_second = operator.itemgetter(1)


def covered(times: list[float], start: float, end: float, gap: float) -> bool:
    """True when samples at `times` (sorted, all within (start, end]) leave no stretch of the window longer
    than `gap` without a sample: the first within `gap` of the start, the last within `gap` of the end, and
    no two consecutive ones further apart."""
    if not times or times[0] - start > gap + _EPS or end - times[-1] > gap + _EPS:
        return False
    return len(times) < 2 or max(map(operator.sub, times[1:], times)) <= gap + _EPS


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile by linear interpolation between the closest ranks (numpy's default)."""
    v = sorted(values)
    k = (len(v) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def linear_forecast(times: list[float], values: list[float], at: float) -> float | None:
    """The least-squares line through the samples, evaluated at `at`; None with fewer than two distinct
    times (no slope to speak of)."""
    n = len(times)
    if n < 2:
        return None
    # Centred on the mean time: epoch-sized times squared would lose the slope to rounding.
    mt = sum(times) / n
    mv = sum(values) / n
    dt = [t - mt for t in times]
    sxx = sum(map(operator.mul, dt, dt))
    if sxx <= 1e-12 * n:
        return None
    sxy = sum(map(operator.mul, dt, values)) - mv * sum(dt)
    return mv + sxy / sxx * (at - mt)


def _all_hold(op: str, values: list[float], bound: float) -> bool:
    """`all(v OP bound for v in values)`, through min and max where the operator allows."""
    if op in (">", ">="):
        return _OPS[op](min(values), bound)
    if op in ("<", "<="):
        return _OPS[op](max(values), bound)
    f = _OPS[op]
    return all(f(v, bound) for v in values)


def _func(f: M.Func, s: _Samples, at: float) -> float | None:
    key = (f.name, f.metric, f.window, f.percentile, at)
    if key in s.memo:
        return s.memo[key]
    times, values = s.span(f.metric, at - f.window, at)
    out: float | None = None
    if covered(times, at - f.window, at, s.gap):
        if f.name == "avg":
            out = sum(values) / len(values)
        elif f.name == "max":
            out = max(values)
        elif f.name == "min":
            out = min(values)
        elif f.name == "percentile":
            out = percentile(values, f.percentile or 50.0)
        elif f.name == "forecast":
            # Fitted over the last `horizon` of samples and extrapolated `horizon` ahead.
            out = linear_forecast(times, values, at + f.window)
    s.memo[key] = out
    return out


def _operand(o: M.Operand, s: _Samples, at: float) -> float | None:
    if isinstance(o, M.Const):
        return float(o.value) if isinstance(o.value, (int, float)) else None
    if isinstance(o, M.Metric):
        return s.latest(o.name, at)
    if isinstance(o, M.Func):
        return _func(o, s, at)
    return None  # step data only appears in chain conditions


def _metrics_of(o: M.Operand) -> tuple[str, ...]:
    if isinstance(o, M.Metric):
        return (o.name,)
    if isinstance(o, M.Func):
        return (o.metric,)
    return ()


# ------------------------------------------------------------------------------------------ conditions


def evaluate_condition(c: M.Condition, s: _Samples, at: float) -> bool | None:
    """Three-valued: True, False, or None when the samples cannot tell (missing, stale, a window not
    covered). `and`, `or` and `not` follow Kleene's logic, so missing data never makes a rule fire."""
    if isinstance(c, M.Cmp):
        if c.window:
            return _held_for(c, s, at)
        return _cmp_at(c, s, at)
    if isinstance(c, M.App):
        state = s.series.app(s.vm, c.name)
        if state is None:
            return None
        return (state == "running") == c.running
    if isinstance(c, M.Negate):
        v = evaluate_condition(c.item, s, at)
        return None if v is None else not v
    if isinstance(c, M.AllOf):
        unknown = False
        for item in c.items:
            v = evaluate_condition(item, s, at)
            if v is False:
                return False
            unknown = unknown or v is None
        return None if unknown else True
    if isinstance(c, M.AnyOf):
        unknown = False
        for item in c.items:
            v = evaluate_condition(item, s, at)
            if v is True:
                return True
            unknown = unknown or v is None
        return None if unknown else False
    raise TypeError(f"not a condition: {c!r}")


def _cmp_at(c: M.Cmp, s: _Samples, at: float) -> bool | None:
    left = _operand(c.left, s, at)
    right = _operand(c.right, s, at)
    if left is None or right is None:
        return None
    return _OPS[c.op](left, right)


def _held_for(c: M.Cmp, s: _Samples, at: float) -> bool | None:
    """`X for D` at `at`: X held at every sample in (at - D, at] (False as soon as one sample says otherwise)
    and the samples cover that window (else None)."""
    start = at - c.window
    names = _metrics_of(c.left) + _metrics_of(c.right)
    if not names:
        return _cmp_at(c, s, at)
    # The common shape, `metric OP constant for D`: the samples themselves, no per-point lookups.
    if isinstance(c.left, M.Metric) and isinstance(c.right, M.Const) and isinstance(c.right.value, (int, float)):
        times, values = s.span(c.left.name, start, at)
        bound = float(c.right.value)
        if values and not _all_hold(c.op, values, bound):
            return False
        return True if covered(times, start, at, s.gap) else None
    points = sorted({t for name in names for t in s.span(name, start, at)[0]})
    unknown = False
    for t in points:
        v = _cmp_at(c, s, t)
        if v is False:
            return False
        unknown = unknown or v is None
    if unknown or not covered(points, start, at, s.gap):
        return None
    return True


def lookback(c: M.Condition | None, gap: float, into: dict[str, float] | None = None) -> dict[str, float]:
    """How far back each metric a condition reads must be fetched: its `for` window plus what each operand
    needs at the window's start (a function's own window, or the gap for a plain metric)."""
    out = {} if into is None else into
    if c is None:
        return out
    if isinstance(c, M.Cmp):
        d = c.window or 0.0
        for o in (c.left, c.right):
            if isinstance(o, M.Metric):
                need = d + gap
            elif isinstance(o, M.Func):
                need = d + o.window
            else:
                continue
            name = o.name if isinstance(o, M.Metric) else o.metric
            out[name] = max(out.get(name, 0.0), need)
    elif isinstance(c, (M.AllOf, M.AnyOf)):
        for item in c.items:
            lookback(item, gap, out)
    elif isinstance(c, M.Negate):
        lookback(c.item, gap, out)
    return out


# ------------------------------------------------------------------------------------------ explaining


def _num(x: float) -> str:
    return f"{x:.1f}".removesuffix(".0")


def duration(seconds: float) -> str:
    """`30s`, `5m`, `1h30m`: how the language writes durations."""
    if seconds != int(seconds):
        return f"{seconds:g}s"
    s = int(seconds)
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            out += f"{s // size}{unit}"
            s %= size
    return out + (f"{s}s" if s or not out else "")


def _rate(v: float) -> str:
    for unit, size in (("GB/s", 1e9), ("MB/s", 1e6), ("KB/s", 1e3)):
        if abs(v) >= size:
            return f"{_num(v / size)}{unit}"
    return f"{_num(v)}B/s"


def _value(metric: str | None, dim: Dimension | None, v: float | None) -> str:
    if v is None:
        return "(no data)"
    if dim is None and metric is not None:
        dim = M.METRICS[metric]
    if dim is Dimension.PERCENT:
        return f"{_num(v)}%"
    if dim is Dimension.RATE:
        return _rate(v)
    return _num(v)


def _operand_text(o: M.Operand, other: M.Operand, s: _Samples, at: float) -> str:
    if isinstance(o, M.Const):
        dim = o.dim
        # A plain number against a percentage reads as a percentage (`cpu > 80`).
        if dim is Dimension.COUNT and _metrics_of(other) and M.METRICS[_metrics_of(other)[0]] is Dimension.PERCENT:
            dim = Dimension.PERCENT
        return _value(None, dim, float(o.value)) if isinstance(o.value, (int, float)) else repr(o.value)
    if isinstance(o, M.Metric):
        return f"{o.name} {_value(o.name, None, s.latest(o.name, at))}"
    if isinstance(o, M.Func):
        name = f"p{o.percentile:g}" if o.name == "percentile" else o.name
        return f"{name}({o.metric}, {duration(o.window)}) {_value(o.metric, None, _func(o, s, at))}"
    return getattr(o, "name", "?")


def explain(c: M.Condition, s: _Samples, at: float) -> str:
    """The condition with the values it saw: `cpu 91.2% > 80% for 30s`. Of an `or`, the parts that hold."""
    if isinstance(c, M.Cmp):
        text = f"{_operand_text(c.left, c.right, s, at)} {c.op} {_operand_text(c.right, c.left, s, at)}"
        return text + (f" for {duration(c.window)}" if c.window else "")
    if isinstance(c, M.App):
        state = s.series.app(s.vm, c.name)
        return f'app("{c.name}") {state or "unknown"}'
    if isinstance(c, M.Negate):
        return f"not ({explain(c.item, s, at)})"
    if isinstance(c, M.AllOf):
        return " and ".join(explain(i, s, at) for i in c.items)
    if isinstance(c, M.AnyOf):
        held = [i for i in c.items if evaluate_condition(i, s, at) is True] or list(c.items)
        return " or ".join(explain(i, s, at) for i in held)
    return "?"


# ------------------------------------------------------------------------------------------ engine


@dataclass(slots=True)
class _Rule:
    """What the engine remembers of one (vm, morph) rule."""

    armed: bool = True  # hysteresis: False after a revert or a fire at the bound, until the condition is false
    last: float | None = None  # when it last fired or reverted: the cooldown runs from here
    skip: str | None = None  # the skip last reported for the current episode, so it is reported once
    held: float | None = None  # when it was first held back by concurrency: first come, first served

    def default(self) -> bool:
        return self.armed and self.last is None and self.skip is None and self.held is None


@dataclass(slots=True)
class _Due:
    vm: str
    spec: M.VmSpec
    morph: M.MorphSpec
    rule: _Rule
    intent: Kind
    samples: _Samples
    condition: M.Condition


class RuleEngine:
    """Evaluates morph rules round after round; see `evaluate`."""

    def __init__(self, limits: Limits = Limits(), *, max_gap: float = DEFAULT_MAX_GAP,
                 default_cooldown: float = DEFAULT_COOLDOWN) -> None:
        self.limits = limits
        self.max_gap = max_gap  # set it a little above the sampling period
        self.default_cooldown = default_cooldown
        self._rules: dict[tuple[str, str], _Rule] = {}
        self._actions: dict[str, list[float]] = {}  # vm -> times of its fires and reverts, oldest first
        self._lookbacks: dict[str, tuple[M.VmSpec, dict[str, float]]] = {}

    # -- evaluating
    def evaluate(self, now: float, vms: Mapping[str, M.VmSpec], states: Mapping[str, VmState], series: Series,
                 busy: set[str] | frozenset[str] = frozenset(),
                 capacity_ok: Callable[[str, VmState], str | None] | None = None) -> list[Decision]:
        """One round at time `now`. `states` are the VMs as observed (their records say which morphs are in
        effect; a VM missing from it is not evaluated), `busy` the VMs being changed right now (their rules
        wait: `paused`), and `capacity_ok(vm, target)` says why the pool cannot take a fire's target, or None
        when it can. Returns the decisions, ordered by VM and morph; at most one acts per VM."""
        due: list[_Due] = []
        for name, spec in vms.items():
            if not spec.morphs:
                continue
            state = states.get(name)
            if state is None:
                continue
            samples = _Samples(series, name, now, self.max_gap, self._lookback(name, spec))
            for m in spec.morphs:
                d = self._due(name, spec, m, state, samples, now)
                if d is not None:
                    due.append(d)
        due.sort(key=lambda d: (d.rule.held if d.rule.held is not None else now, d.vm, d.morph.name))
        decisions: list[Decision] = []
        slots = self.limits.fleet_concurrency - len(busy)
        acted: set[str] = set()
        for d in due:
            out = self._decide(d, now, states[d.vm], busy, acted, slots, capacity_ok)
            if out is not None:
                decisions.append(out)
                if out.kind is not Kind.SKIP:
                    acted.add(d.vm)
        decisions.sort(key=lambda x: (x.vm, x.morph))
        return decisions

    def _lookback(self, name: str, spec: M.VmSpec) -> dict[str, float]:
        cached = self._lookbacks.get(name)
        if cached is not None and cached[0] is spec:
            return cached[1]
        out: dict[str, float] = {}
        for m in spec.morphs:
            lookback(m.condition, self.max_gap, out)
            lookback(m.revert, self.max_gap, out)
        self._lookbacks[name] = (spec, out)
        return out

    def _rule(self, vm: str, morph: str) -> _Rule:
        key = (vm, morph)
        r = self._rules.get(key)
        if r is None:
            r = self._rules[key] = _Rule()
        return r

    def _due(self, vm: str, spec: M.VmSpec, m: M.MorphSpec, state: VmState, samples: _Samples,
             now: float) -> _Due | None:
        """Whether the rule wants to act this round. A morph in effect reverts when its `revert when` holds;
        otherwise it fires when its condition holds and it is armed (an active morph fires again only when
        it is cumulative, `cpu += 2`, and so may still have room)."""
        rule = self._rule(vm, m.name)
        is_active = morphs.active(state, m.name)
        if is_active and m.revert is not None and evaluate_condition(m.revert, samples, now) is True:
            return _Due(vm, spec, m, rule, Kind.REVERT, samples, m.revert)
        if not is_active or morphs.cumulative(m):
            held = evaluate_condition(m.condition, samples, now)
            if held is False:
                rule.armed = True
            elif held is True and rule.armed:
                return _Due(vm, spec, m, rule, Kind.FIRE, samples, m.condition)
        rule.skip = None
        rule.held = None
        return None

    def _decide(self, d: _Due, now: float, state: VmState, busy, acted: set[str], slots: int,
                capacity_ok) -> Decision | None:
        rule, m = d.rule, d.morph
        cooldown = m.cooldown if m.cooldown is not None else self.default_cooldown
        if rule.last is not None and now - rule.last < cooldown:
            left = cooldown - (now - rule.last)
            return self._skip(d, now, Outcome.SKIPPED_COOLDOWN,
                              f"cooldown {duration(cooldown)}, {duration(math.ceil(left))} left")
        if d.vm in busy:
            return self._skip(d, now, Outcome.PAUSED, "the VM is being changed, its rules wait")
        recent = self._recent(d.vm, now)
        if len(recent) >= self.limits.max_morphs_per_vm_per_hour:
            return self._skip(d, now, Outcome.SKIPPED_RATE,
                              f"{len(recent)} morphs of this VM in the last hour "
                              f"(at most {self.limits.max_morphs_per_vm_per_hour})")
        # Concurrency before the target: with the fleet's slots taken, thousands of due rules cost no
        # target each.
        if d.vm in acted:
            rule.held = rule.held if rule.held is not None else now
            return self._skip(d, now, Outcome.SKIPPED_CONCURRENCY,
                              "another morph of this VM acts this round")
        if len(acted) >= slots:
            rule.held = rule.held if rule.held is not None else now
            return self._skip(d, now, Outcome.SKIPPED_CONCURRENCY,
                              f"{len(acted) + len(busy)} VMs are being morphed "
                              f"(at most {self.limits.fleet_concurrency} at once)")
        if d.intent is Kind.FIRE:
            result = morphs.apply_morph(state, d.spec, m)
            if not result.changed:
                rule.armed = False  # re-armed once the condition is false: one report per episode
                rule.held = None
                return self._skip(d, now, Outcome.SKIPPED_BOUND, result.summary)
        else:
            result = morphs.revert_morph(state, d.spec, m)
        if d.intent is Kind.FIRE and capacity_ok is not None:
            short = capacity_ok(d.vm, result.target)
            if short:
                return self._skip(d, now, Outcome.SKIPPED_CAPACITY, short)
        rule.last = now
        # The cooldown that follows the rule's own action is no news: only a hold for another reason, or a
        # new episode during the cooldown, is reported.
        rule.skip = f"{d.intent.value}:{Outcome.SKIPPED_COOLDOWN.value}"
        rule.held = None
        rule.armed = d.intent is Kind.FIRE  # after a revert, the condition must be false before firing again
        self._actions.setdefault(d.vm, []).append(now)
        outcome = Outcome.FIRED if d.intent is Kind.FIRE else Outcome.REVERTED
        return Decision(now, d.vm, m.name, d.intent, outcome, f"{_why(d, now)}: {result.summary}",
                        result.target, d.intent)

    def _skip(self, d: _Due, now: float, outcome: Outcome, held: str) -> Decision | None:
        """A held-back action, reported once per episode: again only when the reason changes, or after the
        rule acted or stopped being due. (The condition is only explained for what is reported.)"""
        key = f"{d.intent.value}:{outcome.value}"
        if d.rule.skip == key:
            return None
        d.rule.skip = key
        return Decision(now, d.vm, d.morph.name, Kind.SKIP, outcome, f"{_why(d, now)}; {held}", None, d.intent)

    def _recent(self, vm: str, now: float) -> list[float]:
        times = self._actions.get(vm)
        if not times:
            return []
        i = bisect.bisect_right(times, now - RATE_WINDOW)
        if i:
            del times[:i]
        return times

    # -- state
    def forget(self, vm: str) -> None:
        """Drop what the engine remembers of a VM (it left the program)."""
        for key in [k for k in self._rules if k[0] == vm]:
            del self._rules[key]
        self._actions.pop(vm, None)
        self._lookbacks.pop(vm, None)

    def state(self) -> dict:
        """What the engine remembers, as JSON-ready data: rules that differ from a fresh one, and each VM's
        actions in the last hour (as of its latest action)."""
        rules: dict[str, dict[str, dict]] = {}
        for (vm, morph), r in sorted(self._rules.items()):
            if not r.default():
                rules.setdefault(vm, {})[morph] = {"armed": r.armed, "last": r.last, "skip": r.skip,
                                                   "held": r.held}
        actions = {vm: [t for t in ts if t > ts[-1] - RATE_WINDOW] for vm, ts in sorted(self._actions.items()) if ts}
        return {"version": STATE_VERSION, "rules": rules, "actions": actions}

    def restore(self, data: Mapping) -> None:
        """Take back what `state()` gave (a controller restart keeps cooldowns, hysteresis and the hourly
        count). Raises ValueError on data of another version or shape."""
        if not isinstance(data, Mapping) or data.get("version") != STATE_VERSION:
            raise ValueError(f"rule engine state: expected version {STATE_VERSION}")
        rules: dict[tuple[str, str], _Rule] = {}
        try:
            for vm, by_morph in dict(data.get("rules") or {}).items():
                for morph, r in dict(by_morph).items():
                    rules[(vm, morph)] = _Rule(bool(r["armed"]), _opt_float(r.get("last")), r.get("skip"),
                                               _opt_float(r.get("held")))
            actions = {vm: sorted(float(t) for t in ts) for vm, ts in dict(data.get("actions") or {}).items()}
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"rule engine state: {err}") from err
        self._rules = rules
        self._actions = actions


def _why(d: _Due, now: float) -> str:
    why = explain(d.condition, d.samples, now)
    return f"revert: {why}" if d.intent is Kind.REVERT else why


def _opt_float(x) -> float | None:
    return None if x is None else float(x)
