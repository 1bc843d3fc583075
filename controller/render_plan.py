"""Plan -> text for a terminal, JSON for tools (specs/plan.md), and back from JSON for saved plans.

Text shows a legend, one block per change with its symbol, the attributes that change (unchanged ones are
hidden and counted), why, and a footer: `Plan: 1 to add, 2 to change (1 live, 1 restart), 0 to replace,
0 to destroy.` Drift comes first, because it changes how the rest reads.
"""

from __future__ import annotations

import hashlib
import json

import click

from compiler.units import format_bytes
from controller.plan import Action, Change, Plan
from controller.state import ActualState, VmState

FORMAT_VERSION = 1
_COLOURS = {Action.CREATE: "green", Action.UPDATE_LIVE: "yellow", Action.UPDATE_RESTART: "yellow",
            Action.REPLACE: "magenta", Action.DELETE: "red"}
_WORDS = {Action.CREATE: "create", Action.UPDATE_LIVE: "update in place, live",
          Action.UPDATE_RESTART: "update in place, with a restart", Action.REPLACE: "replace",
          Action.DELETE: "destroy"}


def attributes(vm: VmState | None) -> dict[str, object]:
    """The attributes a plan shows and compares, flattened to paths."""
    if vm is None:
        return {}
    out: dict[str, object] = {
        "image": vm.image, "pool": vm.pool, "cpu": vm.vcpus, "cpu.bound": vm.max_vcpus,
        "memory": format_bytes(vm.memory_kib * 1024), "memory.bound": format_bytes(vm.max_memory_kib * 1024),
        "running": vm.running,
    }
    for d in vm.disks:
        out[f"disk.{d.name}.size"] = format_bytes(d.size_kib * 1024) if d.size_kib else None
    for n in vm.nics:
        out[f"nic.{n.name}"] = f"bridge {n.bridge}" if n.bridge else f"network {n.network}"
    return out


def _fmt(v: object) -> str:
    if v is None:
        return "(none)"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def render_text(plan: Plan, colour: bool = False, unmanaged: int = 0) -> str:
    def style(s: str, fg: str | None = None, bold: bool = False) -> str:
        return click.style(s, fg=fg, bold=bold) if colour else s

    lines: list[str] = []
    if plan.drift:
        lines.append(style("Drift: these VMs changed outside vmflow since it last applied them:", bold=True))
        for d in plan.drift:
            lines.append(f"  {d.address}  {d.path}: applied {_fmt(d.applied)}, now {_fmt(d.actual)}")
        lines.append("")
    acts = plan.actionable
    if acts:
        lines.append("Symbols: " + ", ".join(style(f"{a.symbol} {w}", _COLOURS[a]) for a, w in (
            (Action.CREATE, "create"), (Action.UPDATE_LIVE, "update live"),
            (Action.UPDATE_RESTART, "update with restart"), (Action.REPLACE, "replace"),
            (Action.DELETE, "destroy"))))
        lines.append("")
    for c in acts:
        lines.extend(_change_lines(c, style))
    for name in plan.held_deletes:
        lines.append(f"  (vm.{name} is no longer declared; it is kept because --prune is not set)")
    for p in plan.problems:
        lines.append(style(f"error: {p.address}: {p.message}", "red", bold=True))
    if not acts and not plan.problems:
        lines.append("No changes. The VMs match the program.")
    if unmanaged:
        lines.append(f"({unmanaged} domain{'s' if unmanaged != 1 else ''} not managed by vmflow left alone)")
    lines.append("")
    lines.append(footer(plan))
    return "\n".join(lines) + "\n"


def footer(plan: Plan) -> str:
    n = plan.counts()
    change = n["update-live"] + n["update-restart"]
    return (f"Plan: {n['create']} to add, {change} to change ({n['update-live']} live, {n['update-restart']} restart), "
            f"{n['replace']} to replace, {n['delete']} to destroy.")


def _change_lines(c: Change, style) -> list[str]:
    head = f"  {style(c.action.symbol.ljust(3), _COLOURS[c.action], bold=True)} {style(c.address, bold=True)}"
    out = [f"{head}  {_WORDS[c.action]}  ({', '.join(r.value for r in c.reasons)})"]
    before, after = attributes(c.before), attributes(c.after)
    keys = sorted(set(before) | set(after))
    hidden = 0
    for k in keys:
        b, a = before.get(k), after.get(k)
        if c.action is Action.CREATE:
            out.append(f"        {k:<16} = {_fmt(a)}")
        elif c.action is Action.DELETE:
            out.append(f"        {k:<16} = {_fmt(b)}")
        elif a != b:
            mark = ""
            if k in c.replace_paths or k.split(".")[0] in c.replace_paths:
                mark = style("  # forces replacement", "magenta")
            elif k in c.restart_paths or any(k.startswith(p) for p in c.restart_paths):
                mark = style("  # forces restart", "yellow")
            out.append(f"        {k:<16} = {_fmt(b)} → {_fmt(a)}{mark}")
        else:
            hidden += 1
    if hidden:
        out.append(f"        ({hidden} unchanged attribute{'s' if hidden != 1 else ''} hidden)")
    out.append("")
    return out


def _vm_json(vm: VmState | None) -> dict | None:
    return attributes(vm) or None


def fingerprint(actual: ActualState, addresses: list[str]) -> str:
    """A hash of what the plan saw of the VMs it touches: a saved plan is stale when this changes."""
    h = hashlib.sha256()
    for a in sorted(addresses):
        vm = actual.vms.get(a.split(".", 1)[1])
        h.update(a.encode())
        h.update(json.dumps(attributes(vm), sort_keys=True, default=str).encode())
    return h.hexdigest()


def to_json(plan: Plan, *, program: str = "", revision: str | None = None, observed: str | None = None) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "program": program,
        "revision": revision,
        "observed": observed,
        "applyable": plan.applyable,
        "summary": plan.counts(),
        "drift": [{"address": d.address, "path": d.path, "applied": d.applied, "actual": d.actual}
                  for d in plan.drift],
        "changes": [{
            "address": c.address,
            "actions": [c.action.value],
            "symbol": c.action.symbol,
            "reason": [r.value for r in c.reasons],
            "before": _vm_json(c.before),
            "after": _vm_json(c.after),
            "forces_restart": list(c.restart_paths),
            "forces_replace": list(c.replace_paths),
        } for c in plan.changes],
        "held_deletes": [f"vm.{n}" for n in plan.held_deletes],
        "problems": [{"address": p.address, "message": p.message} for p in plan.problems],
    }
