"""Pull-request previews: what a change to a program's `.flow` files changes, from one revision to another.

`preview(base, head, program)` compares two compilations of one program. VMs go through the real planner
(controller/plan.py): the head's desired states are planned against the base's as if the base had been
applied (owned by the program, running, the base recorded as apply records it), so each VM change carries
the action and the reasons `vmflow apply` would give it. The rest of the program (pools, morph rules,
chains with their steps and edges, reservations, health checks) is compared block by block as the
FlowGraph and the resolved program describe it. Neither carries positions, so moving a block or
reformatting a file changes nothing.

A preview renders as text for a terminal, as JSON (specs/plan.md, "Pull-request previews") and as Markdown:
one pull-request comment per program, whose first line is a hidden marker CI finds the comment by to update
it in place. `from_git` compiles both revisions straight from git objects (controller/gitsource.py), with no
checkout.
"""

from __future__ import annotations

import dataclasses
import html
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import click
import networkx as nx

from compiler import model as M
from compiler import render
from compiler.diagnostics import Diagnostic, Severity
from compiler.graph import FlowGraph, condition_text
from compiler.program import Compilation, Compiler, find_root
from compiler.source import SourceSet
from compiler.units import format_bytes, format_duration
from controller import render_plan
from controller.domain_xml import applied_owner
from controller.gitsource import GitError, GitErrorKind, GitSource
from controller.plan import Action, Options, Plan, plan

# The Markdown pieces (sections, diff blocks, code spans, fences) and the way bodies are cut are render_plan's,
# so that a preview comment reads and splits as a plan comment does.
from controller.render_plan import (
    MARKDOWN_MIN_CHARS,
    _md_clip,
    _md_code,
    _md_details,
    _md_fence,
    _md_list,
    _md_sections,
    _Section,
    md_budget,
    md_pack,
)
from controller.state import ActualState, desired_state

FORMAT_VERSION = 1
MARKER = "vmflow-preview"

# Base states: how the base revision took part.
BASE_OK, BASE_MISSING, BASE_INVALID = "ok", "missing", "invalid"
ADDED, REMOVED, CHANGED = "added", "removed", "changed"
_SYMBOLS = {ADDED: "+", REMOVED: "-", CHANGED: "~"}
_NOUNS = {"pool": ("pool", "pools"), "vm": ("health check", "health checks"),
          "morph": ("morph rule", "morph rules"), "chain": ("chain", "chains"), "step": ("chain step", "chain steps"),
          "edge": ("chain edge", "chain edges"), "reserve": ("reservation", "reservations")}
_KIND_ORDER = tuple(_NOUNS)
_OPEN_UP_TO = 5  # more detail blocks than this and they start collapsed, as in plan comments
_MERMAID_MAX_CHARS = 20000  # a larger graph is not drawn: it would crowd the comment and GitHub's renderer


@dataclass(frozen=True)
class Revision:
    """One side of a preview: the ref as given and, from git, what it resolved to."""

    ref: str
    sha: str | None = None
    short: str | None = None
    subject: str | None = None

    @property
    def label(self) -> str:
        return self.short or self.ref


@dataclass(frozen=True)
class BlockChange:
    """A block other than a VM's own shape that was added, removed or changed. `before` and `after` are the
    block's facts (readable values, no positions); an added block has no `before`, a removed one no `after`."""

    address: str
    kind: str  # pool | vm | morph | chain | step | edge | reserve
    change: str  # added | removed | changed
    before: dict[str, object]
    after: dict[str, object]

    @property
    def paths(self) -> tuple[str, ...]:
        """The facts that differ (every fact the block has when it was added or removed)."""
        keys = sorted(set(self.before) | set(self.after))
        return tuple(k for k in keys if self.before.get(k) != self.after.get(k))


@dataclass(frozen=True)
class Preview:
    program: str
    base_state: str  # ok | missing (a new program) | invalid (does not compile: everything is added)
    plan: Plan | None  # the VM changes; None when the head does not compile
    changes: tuple[BlockChange, ...]
    graph: FlowGraph | None  # the changed blocks and their direct neighbours, base and head together
    marks: dict[str, str]  # node address -> added | removed | changed
    edge_marks: dict[tuple[str, str], str]
    diagnostics: tuple[Diagnostic, ...] = ()  # the head's, when it does not compile
    sources: SourceSet = field(default_factory=SourceSet)
    base_errors: int = 0  # the base's error count, when it does not compile
    base: Revision | None = None
    head: Revision | None = None
    path: str | None = None  # the program folder relative to the repository's top ("." for the top)

    @property
    def head_ok(self) -> bool:
        return self.plan is not None

    @property
    def has_changes(self) -> bool:
        return bool(self.changes) or (self.plan is not None and bool(self.plan.actionable))


# ------------------------------------------------------------------------------------------ building


def preview(base: Compilation | None, head: Compilation, program: str, *, base_rev: Revision | None = None,
            head_rev: Revision | None = None, path: str | None = None) -> Preview:
    """What changes from `base` to `head`. `base` is None for a program that does not exist there yet; a
    base that does not compile counts as empty, so everything in the head shows as added."""
    if base is None:
        state, base_errors = BASE_MISSING, 0
    elif base.ok and base.program is not None:
        state, base_errors = BASE_OK, 0
    else:
        state = BASE_INVALID
        base_errors = sum(d.severity is Severity.ERROR for d in base.diagnostics)
    if not head.ok or head.program is None:
        return Preview(program, state, None, (), None, {}, {}, tuple(head.diagnostics), head.sources, base_errors, base_rev, head_rev,
                       path)
    old = base.program if state == BASE_OK else M.Program()
    old_graph = base.graph if state == BASE_OK else FlowGraph()
    vm_plan = _vm_plan(old, head.program, program)
    changes = _block_changes(_blocks(old, old_graph), _blocks(head.program, head.graph))
    graph, marks, edge_marks = _changed_graph(old_graph, head.graph, vm_plan, changes)
    return Preview(program, state, vm_plan, changes, graph, marks, edge_marks, (), head.sources, base_errors,
                   base_rev, head_rev, path)


def _vm_plan(old: M.Program, new: M.Program, program: str) -> Plan:
    """The planner on the head's VMs against the base's, as apply would have left them."""
    applied = {}
    for vm in old.vms.values():
        want = desired_state(vm, program)
        applied[vm.name] = dataclasses.replace(want, running=True, owner=applied_owner(want))
    desired = {vm.name: desired_state(vm, program) for vm in new.vms.values()}
    pools = {p.name: (p.cpu, p.memory // 1024 if p.memory else None) for p in new.pools.values()}
    # Deletes are shown (apply needs --prune for them; the renderings say so), however many: a preview says
    # what the pull request means, and the mass-delete guard is apply's to enforce. A real host hot-plugs
    # devices; the live plan (`--libvirt`) says what the actual one does.
    opts = Options(prune=True, allow_mass_delete=True, device_hotplug=True, pools=pools)
    return plan(desired, ActualState(applied), opts)


def _blocks(program: M.Program, graph: FlowGraph) -> dict[str, tuple[str, dict[str, object]]]:
    """Every block but a VM's shape, as address -> (kind, facts). The graph's node attributes are the
    facts, completed from the resolved program with what the graph leaves out (conditions, actions)."""
    out: dict[str, tuple[str, dict[str, object]]] = {}
    g = graph.g
    for p in program.pools.values():
        a = f"pool.{p.name}"
        out[a] = ("pool", _attrs(g, a) | {"disk": format_bytes(p.disk) if p.disk else None})
    for vm in program.vms.values():
        # The rest of a VM (image, pool, sizes, devices) is the planner's: see `_vm_plan`.
        out[f"vm.{vm.name}"] = ("vm", {"health": _health_text(vm.health)})
        for m in vm.morphs:
            a = f"morph.{vm.name}.{m.name}"
            out[a] = ("morph", _attrs(g, a) | {"when": condition_text(m.condition),
                                                "do": [action_text(x) for x in m.actions],
                                                "revert": condition_text(m.revert) if m.revert else None})
    for c in program.chains.values():
        a = f"chain.{c.name}"
        out[a] = ("chain", _attrs(g, a) | {"backoff": _duration(c.backoff), "timeout": _duration(c.timeout)})
        for s in c.steps:
            a = f"chain.{c.name}.step.{s.name}"
            out[a] = ("step", _attrs(g, a) | {
                "timeout": _duration(s.timeout), "backoff": _duration(s.backoff),
                "replicas": f"{s.replicas.base} .. {s.replicas.bound}" if s.replicas else None,
                "scale_on": condition_text(s.scale_on) if s.scale_on else None,
                "do": [action_text(x) for x in s.actions] or None})
    for u, v, attrs in g.edges(data=True):
        if attrs.get("kind") == "flow":
            out[f"{u} -> {v}"] = ("edge", {"data": list(attrs.get("data", ())), "when": attrs.get("when")})
    for r in program.reserves.values():
        a = f"reserve.{r.name}"
        out[a] = ("reserve", _attrs(g, a) | {"fallback": _fallback_text(r.fallback)})
    return out


def _attrs(g: nx.DiGraph, address: str) -> dict[str, object]:
    if address not in g:
        return {}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in g.nodes[address].items() if k != "kind"}


def _block_changes(old: dict, new: dict) -> tuple[BlockChange, ...]:
    out = []
    for a in sorted(set(old) | set(new), key=lambda a: (_KIND_ORDER.index((new.get(a) or old[a])[0]), a)):
        if a in old and a in new:
            kind, before = old[a]
            _, after = new[a]
            if before != after:
                out.append(BlockChange(a, kind, CHANGED, before, after))
        elif a in new:
            kind, after = new[a]
            if kind != "vm":  # a VM that appears or goes is the planner's create or delete
                out.append(BlockChange(a, kind, ADDED, {}, {k: v for k, v in after.items() if v is not None}))
        else:
            kind, before = old[a]
            if kind != "vm":
                out.append(BlockChange(a, kind, REMOVED, {k: v for k, v in before.items() if v is not None}, {}))
    return tuple(out)


def _changed_graph(old: FlowGraph, new: FlowGraph, vm_plan: Plan, changes: tuple[BlockChange, ...]
                   ) -> tuple[FlowGraph, dict[str, str], dict[tuple[str, str], str]]:
    """Base and head in one graph (what was removed kept in place), cut down to the changed nodes and
    edges and their direct neighbours."""
    union = nx.DiGraph(new.g)
    for n, attrs in old.g.nodes(data=True):
        if n not in union:
            union.add_node(n, **attrs)
    for u, v, attrs in old.g.edges(data=True):
        if not union.has_edge(u, v):
            union.add_edge(u, v, **attrs)
    marks: dict[str, str] = {}
    for c in vm_plan.actionable:
        marks[c.address] = {Action.CREATE: ADDED, Action.DELETE: REMOVED}.get(c.action, CHANGED)
    for b in changes:
        if b.kind != "edge":
            marks[b.address] = b.change
    edge_marks: dict[tuple[str, str], str] = {}
    for u, v in union.edges:
        if not new.g.has_edge(u, v):
            edge_marks[(u, v)] = REMOVED
        elif not old.g.has_edge(u, v):
            edge_marks[(u, v)] = ADDED
        elif new.g.edges[u, v] != old.g.edges[u, v]:
            edge_marks[(u, v)] = CHANGED
    # An edge whose ends both came or went with their blocks says nothing of its own.
    edge_marks = {e: m for e, m in edge_marks.items() if not (marks.get(e[0]) == marks.get(e[1]) == m)}
    # An edge between two unchanged nodes (a chain edge added between existing steps) is the change itself.
    focus = set(marks) | {n for e in edge_marks if e[0] not in marks and e[1] not in marks for n in e}
    return FlowGraph(union).neighbourhood(focus), marks, edge_marks


def _duration(s: float | None) -> str | None:
    return format_duration(s) if s else None


def _health_text(h: M.HealthSpec | None) -> str | None:
    if h is None:
        return None
    if h.kind == "app":
        return f'app("{h.arg}") running'
    if h.kind == "port":
        return f"port({h.arg})"
    return h.kind


def _fallback_text(f: tuple) -> str:
    if f and f[0] == "percentile":
        return f"p{f[1]:g}({format_duration(f[2])})"
    return "hold"


def action_text(a: M.Action) -> str:
    """A morph or step action as the language writes it (one line)."""
    if isinstance(a, M.AdjustAction):
        fmt = str if a.resource == "cpu" else format_bytes
        op = {"add": "+=", "sub": "-=", "set": "="}[a.op]
        limit = "" if a.limit is None else f" {'min' if a.op == 'sub' else 'max'} {fmt(a.limit)}"
        return f"{a.resource} {op} {fmt(a.amount)}{limit}"
    if isinstance(a, M.AttachDiskAction):
        src = f", source {a.disk.source}" if a.disk.source else ""
        return f"attach disk {a.disk.name} ({format_bytes(a.disk.size)}{src})"
    if isinstance(a, M.DetachAction):
        return f"detach {a.device} {a.name}"
    if isinstance(a, M.SwapImageAction):
        return f"swap image {a.image}"
    n = a.nic
    return f"nic {n.name} (" + (f"bridge {n.bridge}" if n.bridge else f"network {n.network}") + f", {n.model})"


# ------------------------------------------------------------------------------------------ from git


class PreviewError(Exception):
    """A revision cannot be read (an unknown ref, a repository git cannot open): one line for the user."""


def from_git(path: Path, base_ref: str, head_ref: str, compiler: Compiler) -> tuple[Preview, Compilation]:
    """The preview of the program folder `path` from `base_ref` to `head_ref`, both compiled from the git
    repository holding it (from git objects: no checkout, the working tree is not read). A base where the
    folder holds no `.flow` files is a new program. Returns the head's compilation too, for the live plan."""
    folder = path.resolve() if path.is_dir() else path.resolve().parent
    top = find_root(folder)
    if not (top / ".git").exists():
        raise PreviewError(f"`{path}` is not in a git repository; --base compares two of its revisions")
    rel = folder.relative_to(top).as_posix()
    try:
        src = GitSource(str(top), path="" if rel == "." else rel)
    except GitError as e:
        raise PreviewError(str(e)) from None
    try:
        head_rev = _revision(src, head_ref)
        base_rev = _revision(src, base_ref)
        try:
            head = src.compile(compiler, head_rev.sha)
            base = src.compile(compiler, base_rev.sha)
        except GitError as e:
            raise PreviewError(str(e)) from None
    finally:
        src.close()
    return preview(None if _absent(base) else base, head, src.program_name, base_rev=base_rev, head_rev=head_rev,
                   path=rel), head


def _revision(src: GitSource, ref: str) -> Revision:
    try:
        info = src.commit(src.resolve(ref))
    except GitError as e:
        # GitSource names the revision in its own message when it is unknown; other failures need it added.
        if e.kind is GitErrorKind.UNKNOWN_REVISION or f"`{ref}`" in str(e):
            raise PreviewError(str(e)) from None
        shown = ref if len(ref) <= 80 else ref[:80] + "…"
        raise PreviewError(f"cannot read revision `{shown}`: {e}") from None
    return Revision(ref, info.sha, info.short, info.subject)


def _absent(comp: Compilation) -> bool:
    """The program folder has no `.flow` files at this revision: a program the pull request adds."""
    errors = [d for d in comp.diagnostics if d.severity is Severity.ERROR]
    return not comp.files and bool(errors) and all(d.code == "F212" for d in errors)


# ------------------------------------------------------------------------------------------ summary


def block_counts(p: Preview) -> list[tuple[str, str, int]]:
    """(kind, change, count) for the blocks that changed, in kind order."""
    counts: dict[tuple[str, str], int] = {}
    for b in p.changes:
        counts[(b.kind, b.change)] = counts.get((b.kind, b.change), 0) + 1
    return [(k, c, n) for (k, c), n in sorted(counts.items(), key=lambda kv: (_KIND_ORDER.index(kv[0][0]),
                                                                                (ADDED, CHANGED, REMOVED).index(kv[0][1])))]


def summary(p: Preview) -> str:
    """One line: `web: 1 to add, 2 to change (1 live, 1 restart), 0 to destroy · 1 morph rule changed · base
    abc1234 → head def5678`."""
    parts = []
    if p.plan is None:
        parts.append(f"the head does not compile ({render.summary(list(p.diagnostics))})")
    else:
        n = p.plan.counts()
        text = (f"{n['create']} to add, {n['update-live'] + n['update-restart']} to change "
                f"({n['update-live']} live, {n['update-restart']} restart), ")
        if n["replace"]:
            text += f"{n['replace']} to replace, "
        parts.append(text + f"{n['delete']} to destroy")
        for kind, change, count in block_counts(p):
            one, many = _NOUNS[kind]
            parts.append(f"{count} {one if count == 1 else many} {change}")
    revs = []
    if p.base is not None:
        revs.append(f"base {p.base.label}" + (" (new program)" if p.base_state == BASE_MISSING else ""))
    if p.head is not None:
        revs.append(f"head {p.head.label}")
    if revs:
        parts.append(" → ".join(revs))
    return " · ".join(parts)


def _notes(p: Preview) -> list[str]:
    """What a reader must know to read the rest right."""
    out = []
    base = f" at base {p.base.label}" if p.base is not None else ""
    if p.base_state == BASE_MISSING:
        out.append(f"The program is new: it does not exist{base}, so everything in it is added.")
    elif p.base_state == BASE_INVALID:
        out.append(f"The program does not compile{base} ({p.base_errors} error{'s' if p.base_errors != 1 else ''}), "
                   "so everything in the head is shown as added.")
    if p.plan is not None:
        gone = [c.address for c in p.plan.actionable if c.action is Action.DELETE]
        if gone:
            out.append("VMs no longer declared are deleted only by `vmflow apply --prune`: "
                       + ", ".join(f"`{a}`" for a in gone) + ".")
        if not p.has_changes:
            out.append("No changes: the pull request changes nothing in the program's VMs or blocks.")
    return out


# ------------------------------------------------------------------------------------------ text


def render_text(p: Preview, colour: bool = False, *, live: Plan | None = None, live_uri: str = "",
                unmanaged: int = 0) -> str:
    def style(s: str, fg: str | None = None, bold: bool = False) -> str:
        return click.style(s, fg=fg, bold=bold) if colour else s

    revs = f": base {p.base.label} → head {p.head.label}" if p.base is not None and p.head is not None else ""
    lines = [style(f"Preview of `{p.program}`{revs}", bold=True), ""]
    if p.plan is None:
        lines.append(style("error: the head does not compile; nothing was previewed", "red", bold=True))
        lines.append("")
        lines.append(render.render_plain(list(p.diagnostics), p.sources).rstrip("\n"))
        lines.append("")
        lines.append(summary(p))
        return "\n".join(lines) + "\n"
    notes = _notes(p)
    lines.extend([*notes, ""] if notes else [])
    lines.append(style("VMs, as apply would change them had the base been applied:" if p.base_state == BASE_OK
                       else "VMs, as apply would make them where none exist yet:", bold=True))
    lines.append(render_plan.render_text(p.plan, colour).rstrip("\n"))
    lines.append("")
    if p.changes:
        lines.append(style("Other blocks:", bold=True))
        colours = {ADDED: "green", REMOVED: "red", CHANGED: "yellow"}
        for b in p.changes:
            lines.append(f"  {style(_SYMBOLS[b.change].ljust(3), colours[b.change], bold=True)} "
                         f"{style(b.address, bold=True)}  {b.change}")
            lines.extend(f"        {line}" for line in _fact_lines(b, width=16, diff=False))
            lines.append("")
    if live is not None:
        lines.append(style(f"Live plan at head ({live_uri}):", bold=True))
        lines.append(render_plan.render_text(live, colour, unmanaged).rstrip("\n"))
        lines.append("")
    lines.append(summary(p))
    return "\n".join(lines) + "\n"


def _value(v: object) -> str:
    if v is None:
        return "(none)"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, list):
        return ", ".join(_value(x) for x in v) if v else "(none)"
    # One fact, one line: a line break inside a value would start an unmarked diff line.
    return str(v).replace("\r", "\\r").replace("\n", "\\n")


def _fact_lines(b: BlockChange, width: int, diff: bool) -> list[str]:
    """The facts of a changed block: all of an added or removed one, the differing ones of a changed one.
    As a diff (`- before`, `+ after`) for Markdown, or `key = before → after` for a terminal."""
    shown = b.paths
    w = width or max((len(k) for k in shown), default=0)
    out = []
    for k in shown:
        before, after = b.before.get(k), b.after.get(k)
        if diff:
            if b.change != ADDED:
                out.append(f"- {k:<{w}} = {_value(before)}")
            if b.change != REMOVED:
                out.append(f"+ {k:<{w}} = {_value(after)}")
        elif b.change == CHANGED:
            out.append(f"{k:<{w}} = {_value(before)} → {_value(after)}")
        else:
            out.append(f"{k:<{w}} = {_value(after if b.change == ADDED else before)}")
    hidden = len(set(b.before) | set(b.after)) - len(shown) if b.change == CHANGED else 0
    if hidden:
        out.append(f"{'  ' if diff else ''}({hidden} unchanged fact{'s' if hidden != 1 else ''} hidden)")
    return out


# ------------------------------------------------------------------------------------------ JSON


def to_json(p: Preview, *, live: Plan | None = None, live_uri: str | None = None, unmanaged: int = 0) -> dict:
    """The preview as specs/plan.md documents it ("Pull-request previews")."""
    def rev(r: Revision | None, state: str) -> dict | None:
        if r is None:
            return None
        return {"ref": r.ref, "sha": r.sha, "short": r.short, "subject": r.subject, "state": state}

    vm_doc = render_plan.to_json(p.plan, program=p.program) if p.plan is not None else None
    blocks: dict[str, dict[str, int]] = {}
    for kind, change, n in block_counts(p):
        blocks.setdefault(kind, {ADDED: 0, CHANGED: 0, REMOVED: 0})[change] = n
    return {
        "format_version": FORMAT_VERSION,
        "program": p.program,
        "path": p.path,
        "base": rev(p.base, p.base_state),
        "head": rev(p.head, "ok" if p.head_ok else "invalid"),
        "ok": p.head_ok,
        "changed": p.has_changes,
        "summary": {"vms": vm_doc["summary"] if vm_doc else None, "blocks": blocks},
        "vms": [dict(c, note="needs --prune") if c["actions"] == ["delete"] else c
                for c in (vm_doc["changes"] if vm_doc else []) if c["actions"] != ["no-op"]],
        "problems": vm_doc["problems"] if vm_doc else [],
        "blocks": [{"address": b.address, "kind": b.kind, "change": b.change, "paths": list(b.paths),
                    "before": b.before or None, "after": b.after or None} for b in p.changes],
        "graph": {"nodes": [{"id": n, "kind": k, "change": p.marks.get(n)} for n, k in
                            sorted(p.graph.g.nodes(data="kind"))] if p.graph is not None else [],
                  "edges": [{"from": u, "to": v, "kind": k, "change": p.edge_marks.get((u, v))}
                            for u, v, k in sorted(p.graph.g.edges(data="kind"))] if p.graph is not None else []},
        "diagnostics": [render.as_dict(d, p.sources) for d in p.diagnostics],
        "live": (dict(render_plan.to_json(live, program=p.program), uri=live_uri, unmanaged=unmanaged)
                 if live is not None else None),
    }


# ------------------------------------------------------------------------------------------ mermaid

_CLASSES = {ADDED: "fill:#dafbe1,stroke:#1a7f37,color:#0f5323",
            REMOVED: "fill:#ffebe9,stroke:#cf222e,color:#82071e,stroke-dasharray:5 3",
            CHANGED: "fill:#fff8c5,stroke:#9a6700,color:#4d2d00"}
_LINKS = {ADDED: "stroke:#1a7f37,stroke-width:2px", REMOVED: "stroke:#cf222e,stroke-width:2px,stroke-dasharray:5 3",
          CHANGED: "stroke:#9a6700,stroke-width:2px"}
_NODE_LINE = re.compile(r'^\s+(\w+)\W*"(.*)"\W*$')
_EDGE_LINE = re.compile(r"^\s+(\w+) .* (\w+)$")


def to_mermaid(p: Preview) -> str:
    """The changed part of the graph (FlowGraph.to_mermaid) with the changed nodes and edges styled."""
    if p.graph is None or not len(p.graph):
        return ""
    text = p.graph.to_mermaid()
    ids: dict[str, str] = {}
    edges: list[tuple[str, str]] = []
    for line in text.splitlines()[1:]:
        node = _NODE_LINE.match(line)
        if node and " " not in node[1]:
            ids[node[2]] = node[1]
            continue
        edge = _EDGE_LINE.match(line)
        if edge:
            edges.append((edge[1], edge[2]))
    address = {v: k for k, v in ids.items()}
    lines = [text.rstrip("\n")]
    for mark in (ADDED, REMOVED, CHANGED):
        members = sorted((ids[a] for a, m in p.marks.items() if m == mark and a in ids), key=lambda i: int(i[1:]))
        if members:
            lines.append(f"  classDef {mark} {_CLASSES[mark]}")
            lines.append(f"  class {','.join(members)} {mark}")
    for mark in (ADDED, REMOVED, CHANGED):
        at = [str(i) for i, (u, v) in enumerate(edges) if p.edge_marks.get((address.get(u), address.get(v))) == mark]
        if at:
            lines.append(f"  linkStyle {','.join(at)} {_LINKS[mark]}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ markdown


def marker(p: Preview, part: int = 1) -> str:
    """The hidden first line of a comment body: CI finds the comment by it and updates it in place. The
    folder is in it because two programs in one repository may have the same name."""
    def quote(s: str) -> str:
        return urllib.parse.quote(s, safe="._-~/@+")

    return (f"<!-- {MARKER} program={quote(p.program)}" + (f" path={quote(p.path)}" if p.path else "")
            + (f" part={part}" if part > 1 else "") + " -->")


def render_markdown(p: Preview, *, live: Plan | None = None, live_uri: str = "", unmanaged: int = 0,
                    max_chars: int = 65536) -> list[str]:
    """The preview as pull-request comment bodies: one when it fits in `max_chars`, else several, cut
    between lines as render_plan.render_markdown cuts a plan (`vmflow plan` prints them separated by
    render_plan.MARKDOWN_BREAK). Each body opens with its marker line and the summary."""
    if max_chars < MARKDOWN_MIN_CHARS:
        raise ValueError(f"max_chars must be at least {MARKDOWN_MIN_CHARS}, not {max_chars}")
    line = f"**vmflow** {_md_code(_md_clip(p.program, 100))}: {summary(p)}"
    line = _md_clip(line, max_chars // 4)

    def head(i: int, n: int) -> str:
        return marker(p, i) + "\n" + line + (f" · part {i} of {n}" if n > 1 else "")

    budget = md_budget(head, max_chars)
    return md_pack(_sections(p, live, live_uri, unmanaged, budget), head, budget)


def _fixed(text: str) -> _Section:
    return _Section(lambda _lines, _first: text, [])


def _sections(p: Preview, live: Plan | None, live_uri: str, unmanaged: int, budget: int) -> list[_Section]:
    if p.plan is None:
        return [_fixed(f"**The head{_at(p.head)} does not compile**: {render.summary(list(p.diagnostics))}. "
                       "Fix these and push again:\n"),
                _fenced("", render.render_plain(list(p.diagnostics), p.sources).splitlines())]
    out: list[_Section] = []
    notes = _notes(p)
    if notes:
        out.append(_fixed("".join(_md_escape(n) + "\n\n" for n in notes).rstrip("\n") + "\n"))
    if p.plan.problems:
        items = [f"- {_md_code(x.address)}: {_md_cell(x.message)}" for x in p.plan.problems]
        out.append(_md_list("#### Problems", "`vmflow apply` would refuse the head until these are fixed:", [],
                            items))
    acts = p.plan.actionable
    if acts:
        rows = [f"| {_md_code(c.address)} | {_md_code(c.action.symbol)} {render_plan._MD_WORDS[c.action]} | "
                f"{', '.join(_md_code(r.value) for r in c.reasons)} |" for c in acts]
        intro = ("As `vmflow apply` would change them, had the base been applied:" if p.base_state == BASE_OK
                 else "As `vmflow apply` would make them where none exist yet:")
        out.append(_md_list("#### VMs", intro, ["| VM | action | reasons |", "|---|---|---|"], rows))
    if p.changes:
        rows = [f"| {_md_code(b.address)} | {_md_code(_SYMBOLS[b.change])} {b.change} | "
                f"{', '.join(_md_code(k) for k in b.paths) if b.change == CHANGED else ''} |" for b in p.changes]
        out.append(_md_list("#### Other blocks", "", ["| block | change | what changed |", "|---|---|---|"], rows))
    opened = len(acts) + len(p.changes) <= _OPEN_UP_TO
    details = [_md_details(c, open_=opened, heading="") for c in acts]
    details += [_block_details(b, opened) for b in p.changes]
    for i, d in enumerate(details):
        if i == 0:
            d = _with_heading(d, "#### Details\n\n")
        out.append(d)
    mermaid = to_mermaid(p)
    if mermaid:
        if len(mermaid) <= min(_MERMAID_MAX_CHARS, budget // 2):
            fence = _md_fence(mermaid.splitlines())
            out.append(_fixed(f"#### Graph\n\nThe changed blocks and their direct neighbours: green added, red "
                              f"(dashed) removed, yellow changed.\n\n{fence}mermaid\n{mermaid}{fence}\n"))
        else:
            out.append(_fixed(f"#### Graph\n\nThe graph of the changes has {len(p.graph)} nodes, too many to draw "
                              "here; `vmflow graph` draws the whole program.\n"))
    if live is not None:
        out.append(_fixed(f"### Live plan at head: {_md_code(live_uri)}\n"))
        out.extend(_md_sections(live, unmanaged))
    return out


def _with_heading(sec: _Section, heading: str) -> _Section:
    render_ = sec.render
    return _Section(lambda lines, first: (heading if first else "") + render_(lines, first), sec.lines, sec.whole)


def _block_details(b: BlockChange, open_: bool) -> _Section:
    """One block: a `<details>` holding a diff of its facts."""
    lines = _fact_lines(b, width=0, diff=True)
    what = f" ({', '.join(b.paths)})" if b.change == CHANGED else ""
    summary_ = (f"<code>{_SYMBOLS[b.change]}</code> <b>{html.escape(b.address)}</b>: "
                f"{html.escape(_NOUNS[b.kind][0])} {b.change}{html.escape(what)}")

    def render_(group: list[str], first: bool) -> str:
        fence = _md_fence(group)
        return (f"<details{' open' if open_ else ''}>\n<summary>{summary_}{'' if first else ' (continued)'}"
                f"</summary>\n\n{fence}diff\n" + "".join(x + "\n" for x in group) + f"{fence}\n\n</details>\n")

    return _Section(render_, lines, whole=True)


def _fenced(info: str, lines: list[str]) -> _Section:
    def render_(group: list[str], first: bool) -> str:
        fence = _md_fence(group)
        return ("" if first else "(continued)\n\n") + f"{fence}{info}\n" + "".join(x + "\n" for x in group) + \
            f"{fence}\n"

    return _Section(render_, lines)


def _at(r: Revision | None) -> str:
    return f" ({_md_code(r.label)})" if r is not None else ""


def _md_cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_escape(text: str) -> str:
    """Prose with `names` in code spans: only the characters that would turn it into HTML are escaped."""
    return text.replace("<", "&lt;").replace(">", "&gt;")
