"""AST -> resolved program (compiler/model.py): attributes checked, units converted, names linked.

Two steps, so that most work can be cached per file (compiler/program.py keys the cache on content):
- `lower_file` turns one file's blocks into specs, with every check that needs only that file: known
  attributes, value kinds and units, metrics and functions in conditions, chain-internal structure.
- `link` joins the files: template instances, duplicate names across files, references between blocks
  (a VM's pool, a reservation's VM, a morph step's VM).
Image schemas and capacities are checked afterwards by compiler/validate.py.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

from compiler import ast as A
from compiler import model as M
from compiler.diagnostics import Diagnostic, Label, did_you_mean, error, warning
from compiler.units import MAX_VALUE, Dimension, convert, known_units

_FUNCS = {"avg", "max", "min", "forecast"}
_PERCENTILE = re.compile(r"p(\d{1,2}(?:\.\d+)?)$")
_HEALTH_NAMES = ("agent", "none")
_FORECASTABLE = ("cpu", "memory", "network", "cost")
_ALL_DIMS = tuple(Dimension)
_DEVICE_KINDS = {A.Disk: "disk", A.Nic: "nic", A.Morph: "morph"}
_DIM_WORDS = {
    Dimension.COUNT: "a plain number",
    Dimension.BYTES: "a size",
    Dimension.DURATION: "a duration",
    Dimension.RATE: "a rate",
    Dimension.PERCENT: "a percentage",
}


@dataclass
class FileUnit:
    """What one file contributes, before linking."""

    path: str
    pools: list[M.PoolSpec] = field(default_factory=list)
    vms: list[M.VmSpec] = field(default_factory=list)
    chains: list[M.ChainSpec] = field(default_factory=list)
    reserves: list[M.ReserveSpec] = field(default_factory=list)
    templates: list[A.Template] = field(default_factory=list)
    uses: list[A.Use] = field(default_factory=list)
    imports: list[A.Import] = field(default_factory=list)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    # Blocks declared but not built because of errors: references to them are not reported again.
    failed: set[str] = field(default_factory=set)


class _Ctx:
    """Lowering state: where diagnostics go, and inside a template instance, its arguments and names."""

    def __init__(self, diags: list[Diagnostic], env: dict[str, A.Expr] | None = None,
                 rename: dict[str, str] | None = None, instance: A.Use | None = None) -> None:
        self.diags = diags
        self.env = env
        self.rename = rename or {}
        self.instance = instance

    def err(self, code: str, message: str, span: A.Span | None, **kw) -> None:
        if self.instance is not None:
            kw["labels"] = tuple(kw.get("labels", ())) + (
                Label(self.instance.name.span, f"in template instance `{self.instance.name.value}`"),)
        self.diags.append(error(code, message, span, **kw))

    def warn(self, code: str, message: str, span: A.Span | None, **kw) -> None:
        self.diags.append(warning(code, message, span, **kw))

    def name(self, n: str) -> str:
        return self.rename.get(n, n)


# ------------------------------------------------------------------------------------------ values


def _subst(ctx: _Ctx, e: A.Expr) -> A.Expr | None:
    """Replace `param.x` by the instance's argument (templates); None when the parameter is unknown."""
    if isinstance(e, A.Ref) and e.name.startswith("param."):
        pname = e.name[6:]
        if ctx.env is None:
            ctx.err("F209", f"`{e.name}` used outside a template", e.span, label="no template parameters here")
            return None
        if pname not in ctx.env:
            ctx.err("F209", f"unknown template parameter `{pname}`", e.span, label="not a parameter",
                    help=did_you_mean(pname, ctx.env))
            return None
        return ctx.env[pname]
    return e


def _kind_of(e: A.Expr) -> str:
    return {
        A.Quantity: "a number", A.String: "a string", A.Ref: "a name", A.Call: "a function call",
        A.Compare: "a comparison", A.Range: "a range", A.AppRunning: "an application check",
        A.BoolOp: "a condition", A.Not: "a condition", A.Group: "an expression", A.ListExpr: "a list",
        A.Invalid: "an invalid expression",
    }.get(type(e), "an expression")


def _wrong(ctx: _Ctx, what: str, expected: str, e: A.Expr) -> None:
    ctx.err("F205", f"{what} takes {expected}, found {_kind_of(e)}", e.span, label=f"expected {expected}")


def _expected(dims: tuple[Dimension, ...]) -> str:
    return " or ".join(f"{_DIM_WORDS[d]} like {d.example}" for d in dims)


def _quantity(ctx: _Ctx, what: str, e: A.Expr, dims: tuple[Dimension, ...]) -> tuple[Dimension, float | int] | None:
    if type(e) is not A.Quantity:  # most values are written as a plain quantity: nothing to unwrap
        e = _subst(ctx, e)
        if e is None:
            return None
        while isinstance(e, A.Group):
            e = e.inner
        if not isinstance(e, A.Quantity):
            _wrong(ctx, what, _expected(dims), e)
            return None
    conv = convert(e.number, e.unit)
    if conv is None:
        candidates = [u for d in dims for u in known_units(d)]
        ctx.err("F207", f"unknown unit `{e.unit}` in `{e.text}`", e.span, label="unknown unit",
                help=did_you_mean(e.unit, candidates) or f"units here: {', '.join(candidates) or 'none'}")
        return None
    dim, value = conv
    if dim not in dims:
        ctx.err("F206", f"{what} takes {_expected(dims)}, found {_DIM_WORDS[dim]} `{e.text}`", e.span,
                label=f"this is {_DIM_WORDS[dim]}")
        return None
    if (isinstance(value, float) and not math.isfinite(value)) or value > MAX_VALUE:
        ctx.err("F208", f"`{e.text}` is too large", e.span, label="out of range",
                help=f"values are limited to {MAX_VALUE:,} in base units")
        return None
    return dim, value


def _int(ctx: _Ctx, what: str, e: A.Expr, dim: Dimension) -> int | None:
    q = _quantity(ctx, what, e, (dim,))
    if q is None:
        return None
    value = q[1]
    if isinstance(value, float):
        if dim is Dimension.COUNT or not value.is_integer():
            ctx.err("F205", f"{what} takes a whole number, found `{_text(e)}`", e.span, label="not whole")
            return None
        value = int(value)
    return value


def _float(ctx: _Ctx, what: str, e: A.Expr, dim: Dimension) -> float | None:
    q = _quantity(ctx, what, e, (dim,))
    return None if q is None else float(q[1])


def _text(e: A.Expr) -> str:
    return getattr(e, "text", None) or getattr(e, "name", "") or "?"


def _resource(ctx: _Ctx, what: str, e: A.Expr, dim: Dimension) -> M.Resource | None:
    e = _subst(ctx, e)
    if e is None:
        return None
    if isinstance(e, A.Range):
        lo = _int(ctx, what, e.low, dim)
        hi = _int(ctx, what, e.high, dim)
        if lo is None or hi is None:
            return None
        return M.Resource(lo, hi, e.span)
    v = _int(ctx, what, e, dim)
    return None if v is None else M.Resource(v, v, e.span)


def _string(ctx: _Ctx, what: str, e: A.Expr) -> str | None:
    e = _subst(ctx, e)
    if e is None:
        return None
    if not isinstance(e, A.String):
        _wrong(ctx, what, "a string", e)
        return None
    return e.value


def _ref(ctx: _Ctx, what: str, e: A.Expr) -> tuple[str, A.Span] | None:
    """A name given bare (`rack1`) or quoted (`"ubuntu-24.04"`)."""
    e = _subst(ctx, e)
    if e is None:
        return None
    if isinstance(e, A.Ref):
        return ctx.name(e.name), e.span
    if isinstance(e, A.String) and e.value:
        return ctx.name(e.value), e.span
    _wrong(ctx, what, "a name", e)
    return None


def _health(ctx: _Ctx, e: A.Expr) -> M.HealthSpec | None:
    e = _subst(ctx, e)
    if e is None:
        return None
    if isinstance(e, A.Ref) and e.name in _HEALTH_NAMES:
        return M.HealthSpec(e.name, None, e.span)
    if isinstance(e, A.Call) and e.name.value == "port" and len(e.args) == 1:
        port = _int(ctx, "`port(...)`", e.args[0], Dimension.COUNT)
        if port is None:
            return None
        if not 1 <= port <= 65535:
            ctx.err("F208", f"port {port} is out of range", e.args[0].span, label="not 1..65535")
            return None
        return M.HealthSpec("port", port, e.span)
    if isinstance(e, A.AppRunning):
        app = _app_name(ctx, e.call)
        if app is None:
            return None
        if e.negated:
            ctx.err("F205", "a health check cannot be `not running`", e.span, label="use `running`")
            return None
        return M.HealthSpec("app", app, e.span)
    hint = did_you_mean(e.name, _HEALTH_NAMES) if isinstance(e, A.Ref) else None
    ctx.err("F205", "`health` takes `agent`, `port(N)`, `app(\"name\") running` or `none`", e.span,
            label="not a health check", help=hint)
    return None


def _app_name(ctx: _Ctx, call: A.Call) -> str | None:
    if call.name.value != "app" or len(call.args) != 1:
        ctx.err("F211", f"`{call.name.value}(...) running` needs `app(\"name\")`", call.span,
                label="expected `app(\"name\")`")
        return None
    return _string(ctx, "`app(...)`", call.args[0])


# ------------------------------------------------------------------------------------------ conditions


def _condition(ctx: _Ctx, e: A.Expr, data: dict[str, A.Span] | None = None) -> M.Condition | None:
    """A run-time condition. `data` is given for chain branches: then names are step outputs, not metrics."""
    e = _subst(ctx, e)
    if e is None:
        return None
    if isinstance(e, A.Group):
        return _condition(ctx, e.inner, data)
    if isinstance(e, A.BoolOp):
        items = [_condition(ctx, x, data) for x in e.operands]
        if any(i is None for i in items):
            return None
        return (M.AllOf if e.op == "and" else M.AnyOf)(tuple(items), e.span)
    if isinstance(e, A.Not):
        inner = _condition(ctx, e.operand, data)
        return None if inner is None else M.Negate(inner, e.span)
    if isinstance(e, A.AppRunning):
        app = _app_name(ctx, e.call)
        return None if app is None else M.App(app, not e.negated, e.span)
    if isinstance(e, A.Compare):
        left = _operand(ctx, e.left, data)
        right = _operand(ctx, e.right, data)
        window = None
        if e.window is not None:
            window = _float(ctx, "a `for` window", e.window, Dimension.DURATION)
            if window is None:
                return None
        if left is None or right is None:
            return None
        if not _dims_agree(ctx, left, right, e):
            return None
        return M.Cmp(left, e.op, right, window, e.span)
    ctx.err("F205", f"expected a condition such as `cpu > 80% for 5m`, found {_kind_of(e)}", e.span,
            label="not a condition")
    return None


def _operand_dim(o: M.Operand) -> Dimension | None:
    if isinstance(o, M.Metric):
        return M.METRICS[o.name]
    if isinstance(o, M.Func):
        return M.METRICS[o.metric]
    if isinstance(o, M.Const):
        return o.dim
    return None  # data: its type is only known at run time


def _dims_agree(ctx: _Ctx, left: M.Operand, right: M.Operand, e: A.Compare) -> bool:
    dl, dr = _operand_dim(left), _operand_dim(right)
    if dl is None or dr is None or dl == dr:
        return True
    # A bare number against a percentage reads naturally (`cpu > 80`): accept it as percent.
    if {dl, dr} == {Dimension.PERCENT, Dimension.COUNT}:
        return True
    ctx.err("F206", f"cannot compare {_DIM_WORDS[dl]} with {_DIM_WORDS[dr]}", e.span,
            label=f"{_DIM_WORDS[dl]} {e.op} {_DIM_WORDS[dr]}",
            labels=(Label(e.right.span, f"this is {_DIM_WORDS[dr]}"),))
    return False


def _metric_name(ctx: _Ctx, e: A.Expr, data: dict[str, A.Span] | None) -> str | None:
    if isinstance(e, A.Ref) and e.name in M.METRICS:
        return e.name
    if isinstance(e, A.Ref):
        ctx.err("F210", f"unknown metric `{e.name}`", e.span, label="not a metric",
                help=did_you_mean(e.name, M.METRICS) or f"metrics: {', '.join(M.METRICS)}")
    else:
        _wrong(ctx, "a metric function", "a metric name", e)
    return None


def _operand(ctx: _Ctx, e: A.Expr, data: dict[str, A.Span] | None) -> M.Operand | None:
    e = _subst(ctx, e)
    if e is None:
        return None
    if isinstance(e, A.Ref):
        if data is not None:
            return M.DataRef(e.name, e.span)
        name = _metric_name(ctx, e, data)
        return None if name is None else M.Metric(name, e.span)
    if isinstance(e, A.Quantity):
        q = _quantity(ctx, "a comparison", e, _ALL_DIMS)
        return None if q is None else M.Const(q[1], q[0], e.span)
    if isinstance(e, A.String) and data is not None:
        return M.Const(e.value, Dimension.COUNT, e.span)  # a literal compared with data; typed at run time
    if isinstance(e, A.Call):
        fname = e.name.value
        pm = _PERCENTILE.match(fname)
        if fname not in _FUNCS and not pm:
            ctx.err("F211", f"unknown function `{fname}`", e.name.span, label="not a function",
                    help=did_you_mean(fname, sorted(_FUNCS) + ["p95", "app"]) or
                    "functions: avg, max, min, pNN (p50, p95, p99...), forecast, app")
            return None
        if len(e.args) != 2:
            ctx.err("F211", f"`{fname}` takes a metric and a window, like `{fname}(cpu, 10m)`", e.span,
                    label=f"{len(e.args)} argument{'s' if len(e.args) != 1 else ''}")
            return None
        metric = _metric_name(ctx, e.args[0], None)
        window = _float(ctx, f"the window of `{fname}`", e.args[1], Dimension.DURATION)
        if metric is None or window is None:
            return None
        pct = float(pm.group(1)) if pm else None
        return M.Func("percentile" if pm else fname, metric, window, pct, e.span)
    _wrong(ctx, "a comparison", "a metric, a function or a number", e)
    return None


# ------------------------------------------------------------------------------------------ attributes


def _attrs(ctx: _Ctx, block: str, attrs, schema: dict[str, Callable], required: tuple[str, ...],
           where: A.Span) -> dict:
    """Check a block's attributes against its schema; returns name -> converted value (errors dropped)."""
    out: dict = {}
    seen: dict[str, A.Attr] = {}
    for a in attrs:
        n = a.name.value
        if n in seen:
            ctx.err("F214", f"`{n}` is set twice in {block}", a.name.span, label="set again here",
                    labels=(Label(seen[n].name.span, "first set here"),))
            continue
        seen[n] = a
        conv = schema.get(n)
        if conv is None:
            ctx.err("F203", f"unknown attribute `{n}` in {block}", a.name.span, label="unknown attribute",
                    help=did_you_mean(n, schema) or f"{block} takes: {', '.join(schema)}")
            continue
        v = conv(ctx, f"`{n}`", a.value)
        if v is not None:
            out[n] = v
    for r in required:
        if r not in seen:
            ctx.err("F204", f"{block} is missing `{r}`", where, label=f"needs `{r} = ...`")
    return out


def _count(ctx, what, e):
    return _int(ctx, what, e, Dimension.COUNT)


def _bytes(ctx, what, e):
    return _int(ctx, what, e, Dimension.BYTES)


def _seconds(ctx, what, e):
    return _float(ctx, what, e, Dimension.DURATION)


def _cpu_res(ctx, what, e):
    return _resource(ctx, what, e, Dimension.COUNT)


def _mem_res(ctx, what, e):
    return _resource(ctx, what, e, Dimension.BYTES)


_POOL = {"host": _string, "cpu": _count, "memory": _bytes, "disk": _bytes}
_VM = {"image": _ref, "pool": _ref, "cpu": _cpu_res, "memory": _mem_res,
       "health": lambda ctx, what, e: _health(ctx, e), "description": _string}
_DISK = {"size": _bytes, "source": _string}
_NIC = {"network": _string, "bridge": _string, "model": _string, "mac": _string}
_CHAIN = {"retry": _count, "backoff": _seconds, "timeout": _seconds, "on_error": _ref, "description": _string}
_STEP = dict(_CHAIN, replicas=_cpu_res, scale_on=lambda ctx, what, e: _condition(ctx, e))
_STEP.pop("description")
_RESERVE = {"forecast": None, "ahead": _seconds, "confidence": None, "fallback": None}


def _confidence(ctx: _Ctx, what: str, e: A.Expr) -> float | None:
    e2 = _subst(ctx, e)
    if isinstance(e2, A.Quantity) and e2.unit == "%":
        v = _float(ctx, what, e2, Dimension.PERCENT)
        v = None if v is None else v / 100
    else:
        v = None if e2 is None else _float(ctx, what, e2, Dimension.COUNT)
    if v is not None and not 0 < v <= 1:
        ctx.err("F208", f"confidence {v:g} is outside (0, 1]", e.span, label="expected 0 < c <= 1",
                help="write it as a fraction (`0.8`) or a percentage (`80%`)")
        return None
    return v


def _forecast(ctx: _Ctx, what: str, e: A.Expr) -> tuple[str, ...] | None:
    e = _subst(ctx, e)
    if e is None:
        return None
    items = e.items if isinstance(e, A.ListExpr) else (e,)
    out = []
    for i in items:
        if not isinstance(i, A.Ref) or i.name not in _FORECASTABLE:
            hint = did_you_mean(i.name, _FORECASTABLE) if isinstance(i, A.Ref) else None
            ctx.err("F210", f"cannot forecast `{_text(i)}`", i.span, label="not forecastable",
                    help=hint or f"forecastable: {', '.join(_FORECASTABLE)}")
            return None
        out.append(i.name)
    if not out:
        ctx.err("F205", f"{what} needs at least one of {', '.join(_FORECASTABLE)}", e.span, label="empty")
        return None
    return tuple(out)


def _fallback(ctx: _Ctx, what: str, e: A.Expr) -> tuple | None:
    e = _subst(ctx, e)
    if e is None:
        return None
    if isinstance(e, A.Ref) and e.name == "hold":
        return ("hold",)
    if isinstance(e, A.Call) and _PERCENTILE.match(e.name.value) and len(e.args) == 1:
        window = _float(ctx, f"the window of `{e.name.value}`", e.args[0], Dimension.DURATION)
        return None if window is None else ("percentile", float(e.name.value[1:]), window)
    ctx.err("F205", f"{what} takes `pNN(window)` (e.g. `p95(7d)`) or `hold`", e.span, label="not a fallback")
    return None


_RESERVE.update(forecast=_forecast, confidence=_confidence, fallback=_fallback)


# ------------------------------------------------------------------------------------------ blocks


def _pool(ctx: _Ctx, p: A.Pool) -> M.PoolSpec:
    v = _attrs(ctx, f"pool `{p.name.value}`", p.attrs, _POOL, (), p.name.span)
    return M.PoolSpec(ctx.name(p.name.value), v.get("host"), v.get("cpu"), v.get("memory"), v.get("disk"),
                      p.name.span)


def _disk(ctx: _Ctx, d: A.Disk) -> M.DiskSpec | None:
    v = _attrs(ctx, f"disk `{d.name.value}`", d.attrs, _DISK, ("size",), d.name.span)
    if "size" not in v:
        return None
    if v["size"] <= 0:
        ctx.err("F208", "a disk needs a size above zero", d.name.span, label="size 0")
        return None
    source_span = next((a.value.span for a in d.attrs if a.name.value == "source"), None)
    return M.DiskSpec(d.name.value, v["size"], v.get("source"), d.name.span, source_span)


def _nic(ctx: _Ctx, n: A.Nic) -> M.NicSpec | None:
    v = _attrs(ctx, f"nic `{n.name.value}`", n.attrs, _NIC, (), n.name.span)
    if "network" in v and "bridge" in v:
        ctx.err("F205", f"nic `{n.name.value}` sets both `network` and `bridge`", n.name.span,
                label="choose one")
        return None
    if "network" not in v and "bridge" not in v:
        ctx.err("F204", f"nic `{n.name.value}` is missing `network` (or `bridge`)", n.name.span,
                label="needs `network = \"...\"`")
        return None
    return M.NicSpec(n.name.value, v.get("network"), v.get("bridge"), v.get("model", "virtio"), v.get("mac"),
                     n.name.span)


def _actions(ctx: _Ctx, items, where: str) -> tuple[list[M.Action], float | None, M.Condition | None, bool]:
    actions: list[M.Action] = []
    cooldown = revert = None
    ok = True
    for it in items:
        if isinstance(it, A.Adjust):
            res = it.target.value
            if res not in ("cpu", "memory"):
                ctx.err("F203", f"a morph can adjust `cpu` or `memory`, not `{res}`", it.target.span,
                        label="not adjustable", help=did_you_mean(res, ("cpu", "memory")))
                ok = False
                continue
            dim = Dimension.COUNT if res == "cpu" else Dimension.BYTES
            amount = _int(ctx, f"`{res}`", it.value, dim)
            limit = _int(ctx, f"the `{it.limit_kind}` of `{res}`", it.limit, dim) if it.limit is not None else None
            if amount is None or (it.limit is not None and limit is None):
                ok = False
                continue
            op = {"+=": "add", "-=": "sub", "=": "set"}[it.op]
            if op == "set" and it.limit is not None:
                ctx.err("F205", f"`{it.limit_kind}` only goes with `+=` or `-=`", it.limit.span,
                        label="nothing to limit")
                ok = False
                continue
            if (op == "add" and it.limit_kind == "min") or (op == "sub" and it.limit_kind == "max"):
                want = "max" if op == "add" else "min"
                ctx.err("F205", f"`{it.op}` is limited by `{want}`, not `{it.limit_kind}`", it.limit.span,
                        label=f"use `{want}`")
                ok = False
                continue
            if op != "set" and amount == 0:
                ctx.err("F208", f"`{res} {it.op} 0` changes nothing", it.value.span, label="zero")
                ok = False
                continue
            actions.append(M.AdjustAction(res, op, amount, limit, it.span))
        elif isinstance(it, A.AttachDisk):
            d = _disk(ctx, it.disk)
            if d is None:
                ok = False
            else:
                actions.append(M.AttachDiskAction(d, it.span))
        elif isinstance(it, A.Detach):
            actions.append(M.DetachAction(it.device, it.name.value, it.span))
        elif isinstance(it, A.SwapImage):
            actions.append(M.SwapImageAction(ctx.name(it.image.value), it.span))
        elif isinstance(it, A.Nic):
            n = _nic(ctx, it)
            if n is None:
                ok = False
            else:
                actions.append(M.NicAction(n, it.span))
        elif isinstance(it, A.Cooldown):
            if cooldown is not None:
                ctx.err("F214", f"{where} has two cooldowns", it.span, label="second cooldown")
                ok = False
            cooldown = _seconds(ctx, "`cooldown`", it.value)
        elif isinstance(it, A.Revert):
            if revert is not None:
                ctx.err("F214", f"{where} has two `revert when` clauses", it.span, label="second revert")
                ok = False
            revert = _condition(ctx, it.when)
            ok = ok and revert is not None
    return actions, cooldown, revert, ok


def morph_kinds(actions) -> set[M.MorphKind]:
    """The morph kinds a list of actions belongs to (a valid morph has exactly one)."""
    kinds = set()
    for a in actions:
        if isinstance(a, M.AdjustAction):
            kinds.add(M.MorphKind.CPU if a.resource == "cpu" else M.MorphKind.MEMORY)
        elif isinstance(a, M.AttachDiskAction) or (isinstance(a, M.DetachAction) and a.device == "disk"):
            kinds.add(M.MorphKind.DISK)
        elif isinstance(a, M.SwapImageAction):
            kinds.add(M.MorphKind.IMAGE)
        else:
            kinds.add(M.MorphKind.NETWORK)
    return kinds


def _morph(ctx: _Ctx, vm: str, m: A.Morph) -> M.MorphSpec | None:
    where = f"morph `{m.name.value}`"
    cond = _condition(ctx, m.when)
    actions, cooldown, revert, ok = _actions(ctx, m.items, where)
    if not actions and ok:
        ctx.err("F204", f"{where} has no action", m.name.span, label="does nothing",
                help="add an action such as `cpu += 2` or `swap image NAME`")
        return None
    kinds = morph_kinds(actions)
    if len(kinds) > 1:
        ctx.err("F205", f"{where} mixes {' and '.join(sorted(k.value for k in kinds))} actions", m.name.span,
                label="one kind of change per morph", help="split it into one morph per kind")
        return None
    if cond is None or not ok:
        return None
    if cooldown is None:
        ctx.warn("F320", f"{where} has no cooldown", m.name.span, label="may fire at every sample",
                 help="add `cooldown 10m` so the VM settles between morphs")
    return M.MorphSpec(vm, m.name.value, kinds.pop(), cond, tuple(actions), cooldown, revert, m.name.span)


def _vm(ctx: _Ctx, v: A.Vm) -> M.VmSpec | None:
    name = ctx.name(v.name.value)
    attrs = [i for i in v.items if isinstance(i, A.Attr)]
    a = _attrs(ctx, f"vm `{v.name.value}`", attrs, _VM, ("image", "cpu", "memory"), v.name.span)
    disks, nics, morphs = [], [], []
    names: dict[tuple[str, str], A.Span] = {}
    for it in v.items:
        kind = _DEVICE_KINDS.get(type(it))
        if kind is not None:
            key = (kind, it.name.value)
            if key in names:
                ctx.err("F202", f"{kind} `{it.name.value}` is declared twice in vm `{v.name.value}`",
                        it.name.span, label="declared again", labels=(Label(names[key], "first declared here"),))
                continue
            names[key] = it.name.span
        if isinstance(it, A.Disk):
            d = _disk(ctx, it)
            if d:
                disks.append(d)
        elif isinstance(it, A.Nic):
            n = _nic(ctx, it)
            if n:
                nics.append(n)
        elif isinstance(it, A.Morph):
            m = _morph(ctx, name, it)
            if m:
                morphs.append(m)
    if not all(k in a for k in ("image", "cpu", "memory")):
        return None
    image, image_span = a["image"]
    pool, pool_span = a.get("pool", (None, None))
    return M.VmSpec(name, image, image_span, pool, pool_span, a["cpu"], a["memory"], tuple(disks), tuple(nics),
                    a.get("health"), tuple(morphs), v.name.span)


def _chain(ctx: _Ctx, c: A.Chain) -> M.ChainSpec | None:
    cname = ctx.name(c.name.value)
    attrs = [i for i in c.items if isinstance(i, A.Attr)]
    ca = _attrs(ctx, f"chain `{c.name.value}`", attrs, _CHAIN, (), c.name.span)
    steps: dict[str, M.StepSpec] = {}
    step_spans: dict[str, A.Span] = {}
    for it in c.items:
        if not isinstance(it, (A.Step, A.MorphStep)):
            continue
        sname = it.name.value
        if sname in step_spans:
            ctx.err("F202", f"step `{sname}` is declared twice in chain `{c.name.value}`", it.name.span,
                    label="declared again", labels=(Label(step_spans[sname], "first declared here"),))
            continue
        step_spans[sname] = it.name.span
        if isinstance(it, A.Step):
            sattrs = [i for i in it.items if isinstance(i, A.Attr)]
            sa = _attrs(ctx, f"step `{sname}`", sattrs, _STEP, (), it.name.span)
            ins, outs = [], []
            for io in it.items:
                if isinstance(io, A.Io):
                    (ins if io.direction == "in" else outs).extend(M.Port(n.value, n.span) for n in io.names)
            for ports, word in ((ins, "input"), (outs, "output")):
                seen: dict[str, A.Span] = {}
                for p in ports:
                    if p.name in seen:
                        ctx.err("F202", f"{word} `{p.name}` is listed twice in step `{sname}`", p.span,
                                label="listed again", labels=(Label(seen[p.name], "first listed here"),))
                    seen[p.name] = p.span
            on_error = sa.get("on_error")
            steps[sname] = M.StepSpec(cname, sname, it.image.value, None, tuple(ins), tuple(outs), sa.get("retry"),
                                      sa.get("backoff"), sa.get("timeout"), on_error[0] if on_error else None,
                                      sa.get("replicas"), sa.get("scale_on"), (), it.name.span, it.image.span,
                                      on_error[1] if on_error else None)
        else:
            actions, cooldown, revert, ok = _actions(ctx, it.items, f"step `{sname}`")
            if cooldown is not None or revert is not None:
                ctx.err("F205", "a morph step runs once: `cooldown` and `revert` belong to morph rules",
                        it.name.span, label="not allowed in a step")
            if not actions and ok:
                ctx.err("F204", f"step `{sname}` has no action", it.name.span, label="does nothing")
            steps[sname] = M.StepSpec(cname, sname, None, ctx.name(it.vm.value), (), (), None, None, None, None,
                                      None, None, tuple(actions), it.name.span, it.vm.span)
    edges: list[M.EdgeSpec] = []
    seen_edges: dict[tuple[str, str], A.Span] = {}
    for it in c.items:
        if not isinstance(it, A.Edge):
            continue
        ok = True
        for n in it.path:
            if n.value not in steps:
                if n.value in step_spans:
                    continue  # the step itself had an error, already reported
                ctx.err("F201", f"unknown step `{n.value}` in chain `{c.name.value}`", n.span, label="no such step",
                        help=did_you_mean(n.value, steps))
                ok = False
        cond = None
        if it.when is not None:
            cond = _condition(ctx, it.when, data={})
            ok = ok and cond is not None
        if not ok:
            continue
        for a, b in zip(it.path, it.path[1:]):
            # A condition guards the first hop only: `a -> b -> c when x` branches from a to b.
            first = a is it.path[0]
            if (a.value, b.value) in seen_edges:
                ctx.err("F214", f"the edge `{a.value} -> {b.value}` is declared twice", b.span,
                        label="declared again", labels=(Label(seen_edges[(a.value, b.value)], "first declared here"),),
                        help="one edge per pair of steps; put the condition on that one")
                continue
            seen_edges[(a.value, b.value)] = b.span
            edges.append(M.EdgeSpec(a.value, b.value, cond if first else None, it.span, a.span, b.span))
    for s in steps.values():
        if s.on_error is not None and s.on_error not in steps:
            ctx.err("F201", f"unknown error handler step `{s.on_error}`", s.on_error_span or s.span,
                    label="on_error names no step",
                    help=did_you_mean(s.on_error, steps))
    on_error = ca.get("on_error")
    if on_error and on_error[0] not in steps:
        ctx.err("F201", f"unknown error handler step `{on_error[0]}`", on_error[1], label="no such step",
                help=did_you_mean(on_error[0], steps))
    if not steps:
        ctx.err("F204", f"chain `{c.name.value}` has no steps", c.name.span, label="empty chain")
        return None
    return M.ChainSpec(cname, tuple(steps.values()), tuple(edges), ca.get("retry"), ca.get("backoff"),
                       ca.get("timeout"), on_error[0] if on_error else None, on_error[1] if on_error else None,
                       c.name.span)


def _reserve(ctx: _Ctx, r: A.Reserve) -> M.ReserveSpec | None:
    v = _attrs(ctx, f"reserve `{r.name.value}`", r.attrs, _RESERVE, ("forecast", "ahead"), r.name.span)
    if "forecast" not in v or "ahead" not in v:
        return None
    return M.ReserveSpec(ctx.name(r.name.value), v["forecast"], v["ahead"], v.get("confidence", 0.8),
                         v.get("fallback", ("hold",)), r.name.span)


def _lower_items(ctx: _Ctx, items, unit: FileUnit, in_template: bool = False) -> None:
    for it in items:
        if isinstance(it, A.Pool):
            unit.pools.append(_pool(ctx, it))
        elif isinstance(it, A.Vm):
            s = _vm(ctx, it)
            if s:
                unit.vms.append(s)
            else:
                unit.failed.add(ctx.name(it.name.value))
        elif isinstance(it, A.Chain):
            s = _chain(ctx, it)
            if s:
                unit.chains.append(s)
        elif isinstance(it, A.Reserve):
            s = _reserve(ctx, it)
            if s:
                unit.reserves.append(s)
        elif in_template:
            kind = type(it).__name__.lower()
            ctx.err("F215", f"a template cannot contain `{kind}`", it.span,
                    label="only pool, vm, chain and reserve blocks")
        elif isinstance(it, A.Template):
            unit.templates.append(it)
        elif isinstance(it, A.Use):
            unit.uses.append(it)
        elif isinstance(it, A.Import):
            unit.imports.append(it)


def lower_file(file: A.FileAst) -> FileUnit:
    """Everything about one file that does not need the others."""
    unit = FileUnit(file.path)
    _lower_items(_Ctx(unit.diagnostics), file.items, unit)
    return unit


# ------------------------------------------------------------------------------------------ linking


def _instantiate(use: A.Use, tpl: A.Template, diags: list[Diagnostic], unit: FileUnit) -> None:
    ctx = _Ctx(diags, instance=use)
    params = {p.name.value: p for p in tpl.params}
    env: dict[str, A.Expr] = {}
    seen: dict[str, A.Span] = {}
    ok = True
    for p in tpl.params:
        if p.name.value in seen:
            diags.append(error("F209", f"parameter `{p.name.value}` is declared twice in template "
                               f"`{tpl.name.value}`", p.name.span, label="declared again",
                               labels=(Label(seen[p.name.value], "first declared here"),)))
            ok = False
        seen[p.name.value] = p.name.span
    given: dict[str, A.Span] = {}
    for a in use.attrs:
        n = a.name.value
        if n in given:
            diags.append(error("F214", f"`{n}` is set twice", a.name.span, label="set again here",
                               labels=(Label(given[n], "first set here"),)))
            ok = False
            continue
        given[n] = a.name.span
        if n not in params:
            diags.append(error("F209", f"template `{tpl.name.value}` has no parameter `{n}`", a.name.span,
                               label="unknown parameter",
                               help=did_you_mean(n, params) or _signature(tpl),
                               labels=(Label(tpl.name.span, "template defined here"),)))
            ok = False
            continue
        env[n] = a.value
    for n, p in params.items():
        if n not in env:
            if p.default is None:
                diags.append(error("F209", f"`use {tpl.name.value}` is missing parameter `{n}`", use.name.span,
                                   label=f"needs `{n} = ...`", help=_signature(tpl),
                                   labels=(Label(p.name.span, "parameter declared here"),)))
                ok = False
            else:
                env[n] = p.default
    if not ok:
        return
    inst = use.name.value
    declared = [getattr(i, "name", None) for i in tpl.items]
    ctx.rename = {d.value: (inst if d.value == "self" else f"{inst}_{d.value}") for d in declared if d is not None}
    ctx.env = env
    _lower_items(ctx, tpl.items, unit, in_template=True)


def _signature(tpl: A.Template) -> str:
    ps = ", ".join(p.name.value + (" = ..." if p.default is not None else "") for p in tpl.params)
    return f"template `{tpl.name.value}({ps})`"


def _register(kind: str, items, table: dict, diags: list[Diagnostic]) -> None:
    for s in items:
        first = table.get(s.name)
        if first is not None:
            diags.append(error("F202", f"{kind} `{s.name}` is declared twice", s.span, label="declared again",
                               labels=(Label(first.span, "first declared here"),)))
            continue
        table[s.name] = s


def link(units: list[FileUnit]) -> tuple[M.Program, list[Diagnostic]]:
    """Join the files into one program and check every reference between blocks."""
    diags: list[Diagnostic] = []
    templates: dict[str, A.Template] = {}
    for u in units:
        for t in u.templates:
            if t.name.value in templates:
                diags.append(error("F202", f"template `{t.name.value}` is declared twice", t.name.span,
                                   label="declared again",
                                   labels=(Label(templates[t.name.value].name.span, "first declared here"),)))
            else:
                templates[t.name.value] = t
    instances = FileUnit("<templates>")
    used: set[str] = set()
    for u in units:
        for use in u.uses:
            tpl = templates.get(use.template.value)
            if tpl is None:
                diags.append(error("F201", f"unknown template `{use.template.value}`", use.template.span,
                                   label="no such template", help=did_you_mean(use.template.value, templates)))
                continue
            used.add(tpl.name.value)
            _instantiate(use, tpl, diags, instances)
    for name, t in templates.items():
        if name not in used:
            diags.append(warning("F216", f"template `{name}` is never used", t.name.span, label="unused",
                                 help=f"instantiate it with `use {name} as NAME {{ ... }}`"))
    diags.extend(instances.diagnostics)

    prog = M.Program()
    all_units = list(units) + [instances]
    for u in all_units:
        _register("pool", u.pools, prog.pools, diags)
        _register("vm", u.vms, prog.vms, diags)
        _register("chain", u.chains, prog.chains, diags)
        _register("reserve", u.reserves, prog.reserves, diags)

    pools = prog.pools
    failed = set().union(*(u.failed for u in all_units))
    for vm in prog.vms.values():
        if vm.pool is not None and vm.pool not in pools:
            diags.append(error("F201", f"unknown pool `{vm.pool}`", vm.pool_span, label="no such pool",
                               help=did_you_mean(vm.pool, pools)))
        elif vm.pool is None and len(pools) > 1:
            diags.append(error("F204", f"vm `{vm.name}` must name its pool: the program has {len(pools)} pools",
                               vm.span, label="needs `pool = ...`",
                               help=f"pools: {', '.join(sorted(pools))}"))
    for r in prog.reserves.values():
        if r.name not in prog.vms and r.name not in pools and r.name not in failed:
            diags.append(error("F201", f"reserve `{r.name}` names no vm or pool", r.span, label="unknown",
                               help=did_you_mean(r.name, list(prog.vms) + list(pools))))
    for c in prog.chains.values():
        for s in c.steps:
            if s.vm is not None and s.vm not in prog.vms and s.vm not in failed:
                diags.append(error("F201", f"unknown vm `{s.vm}`", s.image_span or s.span, label="no such vm",
                                   help=did_you_mean(s.vm, prog.vms)))
    return prog, diags
