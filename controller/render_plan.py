"""Plan -> text for a terminal, JSON for tools (specs/plan.md), Markdown for pull-request comments, and back
from JSON for saved plans.

Text shows a legend, one block per change with its symbol, the attributes that change (unchanged ones are
hidden and counted), why, and a footer: `Plan: 1 to add, 2 to change (1 live, 1 restart), 0 to replace,
0 to destroy.` Drift comes first, because it changes how the rest reads.

Markdown says the same for a code-review page: the footer as the summary, drift, problems, a table of the
changes, then each change's attribute diff in a `<details>` block. A comment has a size limit, so the
Markdown comes as one or more bodies, cut between blocks and never inside a fenced block.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from dataclasses import dataclass
from typing import Callable

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
        out[f"nic.{n.name}"] = (f"bridge {n.bridge}" if n.bridge else f"network {n.network}") + f" ({n.model})"
    return out


def _fmt(v: object) -> str:
    if v is None:
        return "(none)"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def _drift_value(path: str, value: object) -> str:
    """Drift is recorded in libvirt's units (KiB of memory); people read sizes."""
    if path.startswith("memory") and isinstance(value, int):
        return format_bytes(value * 1024)
    return _fmt(value)


def render_text(plan: Plan, colour: bool = False, unmanaged: int = 0) -> str:
    def style(s: str, fg: str | None = None, bold: bool = False) -> str:
        return click.style(s, fg=fg, bold=bold) if colour else s

    lines: list[str] = []
    if plan.drift:
        lines.append(style("Drift: these VMs changed outside vmflow since it last applied them:", bold=True))
        for d in plan.drift:
            lines.append(f"  {d.address}  {d.path}: applied {_drift_value(d.path, d.applied)}, "
                         f"now {_drift_value(d.path, d.actual)}")
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
    why = ("--prune is not set" if plan.held_because == "no-prune"
           else "deleting this many needs --allow-mass-delete")
    for name in plan.held_deletes:
        lines.append(f"  (vm.{name} is no longer declared; it is kept because {why})")
    for p in plan.problems:
        lines.append(style(f"error: {p.address}: {p.message}", "red", bold=True))
    if not acts and not plan.problems:
        lines.append("No changes to apply." if plan.held_deletes else "No changes. The VMs match the program.")
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
            elif any(k == p or k.startswith(p + ".") for p in c.restart_paths):
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
        "held_because": plan.held_because if plan.held_deletes else None,
        "problems": [{"address": p.address, "message": p.message} for p in plan.problems],
    }


# ------------------------------------------------------------------------------------------ markdown

# Printed between two bodies by `vmflow plan --format markdown`: invisible once rendered, easy to split on.
MARKDOWN_BREAK = "<!-- vmflow: next comment -->"
MARKDOWN_MIN_CHARS = 1000  # below this a body cannot hold a title, a table header and a diff line
_OPEN_UP_TO = 5  # more changes than this and their details start collapsed
_MD_WORDS = {Action.CREATE: "create", Action.UPDATE_LIVE: "update live",
             Action.UPDATE_RESTART: "update with restart", Action.REPLACE: "replace", Action.DELETE: "destroy"}


@dataclass
class _Section:
    """A run of lines (table rows, list items, diff lines) and how to wrap any slice of them: `render(lines,
    first)` is complete Markdown on its own, with the heading, the table header or the fence around them,
    and marked continued unless `first`. A section without lines is one fixed block."""

    render: Callable[[list[str], bool], str]
    lines: list[str]
    whole: bool = False  # moved whole to the next body when it fits there, rather than cut


def render_markdown(plan: Plan, *, program: str, unmanaged: int = 0, max_chars: int = 65536) -> list[str]:
    """The plan as pull-request comment bodies, each at most `max_chars` characters.

    One body when it fits. Otherwise each body is filled in turn and the content is cut between lines: a
    table or a list goes on in the next body under its heading marked continued, a diff in another
    `<details>` block with its own fence. Every body's title then says `part i of n`.
    """
    if max_chars < MARKDOWN_MIN_CHARS:
        raise ValueError(f"max_chars must be at least {MARKDOWN_MIN_CHARS}, not {max_chars}")

    def title(i: int, n: int) -> str:
        return f"### vmflow plan: {_md_code(_md_clip(program, 100))}" + (f" (part {i} of {n})" if n > 1 else "")

    budget = md_budget(title, max_chars)
    return md_pack(_md_sections(plan, unmanaged), title, budget)


def md_budget(head, max_chars: int) -> int:
    """The characters a body has for its sections once `head(i, n)` is written above them. Room is kept
    for the longest head a body could get: there are never a million parts."""
    return max_chars - len(head(10**6, 10**6)) - 2


def md_pack(sections: list[_Section], head, budget: int) -> list[str]:
    """Fill bodies of at most `budget` characters with the sections in turn, cutting a section between its
    lines when it does not fit, and put `head(i, n)` above each body. Plans and previews share it, so a
    preview comment splits as a plan comment does."""
    bodies: list[list[str]] = [[]]
    used = 0
    for sec in sections:
        lines = [_md_clip(line, _md_room(sec, line, budget)) for line in sec.lines]
        first = True
        while True:
            room = budget - used - (1 if bodies[-1] else 0)
            k = _md_fit(sec, lines, first, room)
            if sec.whole and bodies[-1] and k < len(lines) and len(sec.render(lines, first)) <= budget:
                k = 0
            if k == 0 and (lines or len(sec.render([], first)) > room):
                if bodies[-1]:
                    bodies.append([])  # nothing of it fits here; an empty body has room for one line
                    used = 0
                    continue
                k = min(1, len(lines))  # clipped to fit an empty body, so this cannot pass the limit
            block = sec.render(lines[:k], first)
            used += len(block) + (1 if bodies[-1] else 0)
            bodies[-1].append(block)
            lines, first = lines[k:], False
            if not lines:
                break
            bodies.append([])
            used = 0
    n = len(bodies)
    return [head(i, n) + "\n\n" + "\n".join(body) for i, body in enumerate(bodies, 1)]


def _md_fit(sec: _Section, lines: list[str], first: bool, room: int) -> int:
    """How many of `lines` fit in `room` characters once wrapped (the length grows with every line)."""
    lo, hi = 0, len(lines)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(sec.render(lines[:mid], first)) <= room:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _md_room(sec: _Section, line: str, budget: int) -> int:
    """The longest a line may be so that it fits alone in an empty body, however it is wrapped."""
    wrapped = max(len(sec.render([line], True)), len(sec.render([line], False)))
    return len(line) + budget - wrapped


def _md_sections(plan: Plan, unmanaged: int) -> list[_Section]:
    out = [_Section(lambda _lines, _first: _md_summary(plan), [])]
    if plan.drift:
        rows = [f"| {_md_code(d.address)} | {_md_code(d.path)} | {_md_cell(_md_drift_value(d.path, d.applied))} "
                f"| {_md_cell(_md_drift_value(d.path, d.actual))} |" for d in plan.drift]
        out.append(_md_list("#### Drift", "These VMs changed outside vmflow since it last applied them:",
                            ["| VM | attribute | applied | now |", "|---|---|---|---|"], rows))
    if plan.problems:
        items = [f"- {_md_code(p.address)}: {_md_cell(p.message)}" for p in plan.problems]
        out.append(_md_list("#### Problems", "`vmflow apply` refuses this plan until these are fixed:", [], items))
    acts = plan.actionable
    if acts:
        rows = [f"| {_md_code(c.address)} | {_md_code(c.action.symbol)} {_MD_WORDS[c.action]} | "
                f"{', '.join(_md_code(r.value) for r in c.reasons)} |" for c in acts]
        out.append(_md_list("#### Changes", "", ["| VM | action | reasons |", "|---|---|---|"], rows))
    notes = []
    if plan.held_deletes:
        notes.append("- No longer declared, kept: " + ", ".join(_md_code(f"vm.{n}") for n in plan.held_deletes)
                     + ". Deleting needs `--prune`, and `--allow-mass-delete` for more than half of the VMs.")
    morphed = [c.address for c in plan.changes if c.action is Action.NOOP and c.reasons]
    if morphed:
        notes.append("- Unchanged, their active morphs explain the difference: "
                     + ", ".join(_md_code(a) for a in morphed) + ".")
    if unmanaged:
        notes.append(f"- {unmanaged} domain{'s' if unmanaged != 1 else ''} not managed by vmflow left alone.")
    if notes:
        out.append(_md_list("#### Notes", "", [], notes))
    for i, c in enumerate(acts):
        out.append(_md_details(c, open_=len(acts) <= _OPEN_UP_TO, heading="#### Details\n\n" if i == 0 else ""))
    return out


def _md_summary(plan: Plan) -> str:
    lines = [f"**{footer(plan)}**"]
    if not plan.applyable:
        n = len(plan.problems)
        lines.append(f"**Not applyable:** {n} problem{'s' if n != 1 else ''}, listed below.")
    elif not plan.actionable:
        lines.append("No changes. The VMs match the program.")
    return "\n\n".join(lines) + "\n"


def _md_list(heading: str, intro: str, header: list[str], lines: list[str]) -> _Section:
    """A heading over a table or a list; a continued one repeats the heading (marked) and the table header."""
    def render(group: list[str], first: bool) -> str:
        text = heading if first else f"{heading} (continued)"
        text += "\n\n" + (intro + "\n\n" if intro and first else "")
        return text + "".join(line + "\n" for line in header + group)

    return _Section(render, lines)


def _md_details(c: Change, open_: bool, heading: str) -> _Section:
    """One change: a `<details>` block holding a diff of its attributes (`- before`, `+ after`)."""
    before, after = attributes(c.before), attributes(c.after)
    keys = sorted(set(before) | set(after))
    shown = [k for k in keys if c.action in (Action.CREATE, Action.DELETE) or before.get(k) != after.get(k)]
    hidden = len(keys) - len(shown)
    width = max((len(k) for k in shown), default=0)
    lines: list[str] = []
    for k in shown:
        if k in before and c.action is not Action.CREATE:
            lines.append(f"- {k:<{width}} = {_md_value(before[k])}")
        if k in after and c.action is not Action.DELETE:
            mark = _md_forces(c, k)
            lines.append(f"+ {k:<{width}} = {_md_value(after[k])}" + (f"  # forces {mark}" if mark else ""))
    if hidden:
        lines.append(f"  ({hidden} unchanged attribute{'s' if hidden != 1 else ''} hidden)")
    reasons = ", ".join(r.value for r in c.reasons)
    summary = (f"<code>{html.escape(c.action.symbol)}</code> <b>{html.escape(c.address)}</b>: "
               f"{html.escape(_WORDS[c.action])} ({html.escape(reasons)})")

    def render(group: list[str], first: bool) -> str:
        fence = _md_fence(group)
        return ((heading if first else "") + f"<details{' open' if open_ else ''}>\n"
                f"<summary>{summary}{'' if first else ' (continued)'}</summary>\n\n{fence}diff\n"
                + "".join(line + "\n" for line in group) + f"{fence}\n\n</details>\n")

    return _Section(render, lines, whole=True)


def _md_forces(c: Change, key: str) -> str | None:
    """What a changed attribute forces; paths match whole segments (`nic.lan` is not `nic.lan2`)."""
    def under(paths: tuple[str, ...]) -> bool:
        return any(key == p or key.startswith(p + ".") for p in paths)

    if c.action in (Action.CREATE, Action.DELETE):
        return None
    if under(c.replace_paths):
        return "replacement"
    if under(c.restart_paths):
        return "restart"
    return None


def _md_drift_value(path: str, value: object) -> str:
    # Drift holds memory as libvirt reports it, in KiB; the diffs show sizes, so drift does too.
    if path.split(".")[0] == "memory" and isinstance(value, int) and not isinstance(value, bool):
        return format_bytes(value * 1024)
    return _fmt(value)


def _md_value(value: object) -> str:
    # One attribute, one diff line: a line break inside a value would start an unmarked line.
    return _fmt(value).replace("\r", "\\r").replace("\n", "\\n")


def _md_code(text: str) -> str:
    """`text` as an inline code span, whatever backticks it holds (CommonMark: a longer run around it)."""
    run = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * (run + 1)
    pad = " " if run else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _md_cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_fence(lines: list[str]) -> str:
    """A backtick fence longer than any run of backticks in the block, so no line inside can close it."""
    run = max((len(m) for line in lines for m in re.findall(r"`{3,}", line)), default=0)
    return "`" * max(3, run + 1)


def _md_clip(line: str, room: int) -> str:
    return line if len(line) <= room else line[: max(room - 1, 0)] + "…"
