"""Resolved program -> FlowGraph: the program as a NetworkX DAG of typed addresses.

Nodes are addresses (`pool.rack1`, `image.linux-base`, `vm.web`, `morph.web.grow`,
`chain.image_processing`, `chain.image_processing.step.resize`, `reserve.web`); an edge u -> v means u
must exist (or run) before v: a pool before its VMs, an image before what boots it, a step before the steps
its outputs feed, each data edge labelled with the names it carries. The graph carries no spans, so two
programs that mean the same thing have equal graphs whatever their files look like.
"""

from __future__ import annotations

import json

import networkx as nx

from compiler import model as M
from compiler.units import format_bytes, format_duration

FORMAT_VERSION = 1


def step_address(chain: str, step: str) -> str:
    return f"chain.{chain}.step.{step}"


class FlowGraph:
    """A DiGraph of addresses with a `kind` on every node and edge."""

    def __init__(self, g: nx.DiGraph | None = None) -> None:
        self.g = g if g is not None else nx.DiGraph()

    def __contains__(self, address: str) -> bool:
        return address in self.g

    def __len__(self) -> int:
        return self.g.number_of_nodes()

    def nodes(self, kind: str | None = None) -> list[str]:
        return sorted(n for n, k in self.g.nodes(data="kind") if kind is None or k == kind)

    def order(self) -> list[str]:
        """A dependency order (pools and images first), stable for a given graph."""
        return list(nx.lexicographical_topological_sort(self.g))

    def subgraph(self, addresses) -> FlowGraph:
        return FlowGraph(self.g.subgraph(addresses).copy())

    def neighbourhood(self, addresses) -> FlowGraph:
        """The given nodes with their direct neighbours: the context of a change, for previews."""
        keep = set()
        for a in addresses:
            if a in self.g:
                keep.add(a)
                keep.update(self.g.predecessors(a))
                keep.update(self.g.successors(a))
        return self.subgraph(keep)

    # -- renderings
    def to_json(self) -> dict:
        nodes = [{"id": n, **attrs} for n, attrs in sorted(self.g.nodes(data=True))]
        edges = [{"from": u, "to": v, **attrs} for u, v, attrs in sorted(self.g.edges(data=True))]
        return {"format_version": FORMAT_VERSION, "nodes": nodes, "edges": edges}

    def to_dot(self) -> str:
        lines = ["digraph flow {", "  rankdir=LR;", "  node [shape=box, fontname=\"monospace\"];"]
        shapes = {"pool": "cylinder", "image": "folder", "morph": "diamond", "reserve": "note", "chain": "component"}
        for n, kind in sorted(self.g.nodes(data="kind")):
            lines.append(f"  {json.dumps(n)} [shape={shapes.get(kind, 'box')}];")
        for u, v, attrs in sorted(self.g.edges(data=True)):
            label = ", ".join(attrs.get("data", ())) or (attrs.get("when") or "")
            extra = f" [label={json.dumps(label)}]" if label else ""
            style = " [style=dashed]" if attrs.get("kind") in ("image", "contains") and not extra else ""
            lines.append(f"  {json.dumps(u)} -> {json.dumps(v)}{extra or style};")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def to_mermaid(self) -> str:
        ids = {n: f"n{i}" for i, n in enumerate(sorted(self.g.nodes))}
        shapes = {"pool": ("[(", ")]"), "image": ("[/", "/]"), "morph": ("{", "}"), "reserve": (">", "]"),
                  "chain": ("[[", "]]")}
        lines = ["flowchart LR"]
        for n, kind in sorted(self.g.nodes(data="kind")):
            a, b = shapes.get(kind, ("[", "]"))
            lines.append(f"  {ids[n]}{a}\"{n}\"{b}")
        for u, v, attrs in sorted(self.g.edges(data=True)):
            label = ", ".join(attrs.get("data", ())) or (attrs.get("when") or "")
            arrow = f"-->|\"{label}\"|" if label else ("-.->" if attrs.get("kind") in ("image", "contains") else "-->")
            lines.append(f"  {ids[u]} {arrow} {ids[v]}")
        return "\n".join(lines) + "\n"


def _resource(r: M.Resource, fmt=str) -> list:
    return [fmt(r.base), fmt(r.bound)]


def build(program: M.Program) -> FlowGraph:
    g = nx.DiGraph()
    add_node, add_edge = g.add_node, g.add_edge

    def image(i: str) -> str:
        a = f"image.{i}"
        if a not in g:
            add_node(a, kind="image")
        return a

    for p in program.pools.values():
        add_node(f"pool.{p.name}", kind="pool", host=p.host, cpu=p.cpu,
                 memory=format_bytes(p.memory) if p.memory else None)
    for vm in program.vms.values():
        va = f"vm.{vm.name}"
        add_node(va, kind="vm", image=vm.image, pool=vm.pool, cpu=_resource(vm.cpu),
                 memory=_resource(vm.memory, format_bytes), disks=[d.name for d in vm.disks],
                 nics=[n.name for n in vm.nics], health=vm.health.kind if vm.health else None)
        add_edge(image(vm.image), va, kind="image")
        if vm.pool is not None and f"pool.{vm.pool}" in g:
            add_edge(f"pool.{vm.pool}", va, kind="placement")
        for m in vm.morphs:
            ma = f"morph.{vm.name}.{m.name}"
            add_node(ma, kind="morph", morph=m.kind.value,
                     cooldown=format_duration(m.cooldown) if m.cooldown else None, revert=m.revert is not None)
            add_edge(va, ma, kind="morph")
            for a in m.actions:
                if isinstance(a, M.SwapImageAction):
                    add_edge(image(a.image), ma, kind="image")
    for c in program.chains.values():
        ca = f"chain.{c.name}"
        add_node(ca, kind="chain", retry=c.retry, backoff=c.backoff, timeout=c.timeout, on_error=c.on_error)
        for s in c.steps:
            sa = step_address(c.name, s.name)
            add_node(sa, kind="step", image=s.image, vm=s.vm, inputs=[p.name for p in s.inputs],
                     outputs=[p.name for p in s.outputs], retry=s.retry, timeout=s.timeout, on_error=s.on_error,
                     replicas=_resource(s.replicas) if s.replicas else None)
            add_edge(ca, sa, kind="contains")
            if s.image is not None:
                add_edge(image(s.image), sa, kind="image")
            elif s.vm is not None and f"vm.{s.vm}" in g:
                add_edge(f"vm.{s.vm}", sa, kind="morph")
        by_name = {s.name: s for s in c.steps}
        for e in c.edges:
            u, v = step_address(c.name, e.src), step_address(c.name, e.dst)
            dst, src = by_name[e.dst], by_name[e.src]
            carried = sorted({p.name for p in dst.inputs} & {p.name for p in src.outputs})
            attrs = {"kind": "flow", "data": carried}
            if e.condition is not None:
                attrs["when"] = condition_text(e.condition)
            add_edge(u, v, **attrs)
    for r in program.reserves.values():
        ra = f"reserve.{r.name}"
        add_node(ra, kind="reserve", forecast=list(r.metrics), ahead=format_duration(r.ahead),
                 confidence=r.confidence)
        target = f"vm.{r.name}" if f"vm.{r.name}" in g else f"pool.{r.name}"
        if target in g:
            add_edge(target, ra, kind="reserve")
    return FlowGraph(g)


def condition_text(c: M.Condition) -> str:
    """A canonical one-line rendering of a resolved condition (for graphs and plans)."""
    if isinstance(c, M.Cmp):
        s = f"{_operand_text(c.left)} {c.op} {_operand_text(c.right)}"
        return s + (f" for {format_duration(c.window)}" if c.window else "")
    if isinstance(c, M.App):
        return f'app("{c.name}") ' + ("running" if c.running else "not running")
    if isinstance(c, M.Negate):
        return f"not ({condition_text(c.item)})"
    joiner = " and " if isinstance(c, M.AllOf) else " or "
    return joiner.join(f"({condition_text(i)})" if isinstance(i, (M.AllOf, M.AnyOf)) else condition_text(i)
                       for i in c.items)


def _operand_text(o: M.Operand) -> str:
    if isinstance(o, M.Metric):
        return o.name
    if isinstance(o, M.DataRef):
        return o.name
    if isinstance(o, M.Func):
        name = f"p{o.percentile:g}" if o.percentile is not None else o.name
        return f"{name}({o.metric}, {format_duration(o.window)})"
    if isinstance(o.value, str):
        return json.dumps(o.value)
    if o.dim.value == "percent":
        return f"{o.value:g}%"
    if o.dim.value == "bytes":
        return format_bytes(o.value)
    if o.dim.value == "duration":
        return format_duration(o.value)
    if o.dim.value == "rate":
        return format_bytes(o.value) + "/s"
    return f"{o.value:g}"
