"""Resolved program + image catalog -> diagnostics: what a program may not ask of its images and pools.

The last compiler stage (F213 and F3xx). It runs only on a program that resolved without errors, so every
name here already exists: what is left is meaning. Bounds against image limits and pool capacity, morphs
against image capabilities and VM bounds, chains' data flow against the images' typed inputs and outputs,
cycles and unreachable steps, and image sources that would escape the image root.
"""

from __future__ import annotations

import networkx as nx

from compiler import model as M
from compiler.diagnostics import Diagnostic, Label, did_you_mean, error
from compiler.images import Catalog, check_source_path
from compiler.resolve import morph_kinds as resolve_kinds
from compiler.units import format_bytes

# The capability an image must declare for each morph kind to be applied live.
CAPABILITY = {
    M.MorphKind.CPU: ("cpu_hotplug",),
    M.MorphKind.MEMORY: ("memory_balloon", "memory_hotplug"),
    M.MorphKind.DISK: ("disk_hotplug",),
    M.MorphKind.NETWORK: ("nic_hotplug",),
}
_WORDS = {"cpu_hotplug": "CPU hotplug", "memory_balloon": "a memory balloon", "disk_hotplug": "disk hotplug",
          "nic_hotplug": "NIC hotplug"}


def _fmt(resource: str, v: int) -> str:
    return format_bytes(v) if resource == "memory" else str(v)


def _amount(resource: str, v: int) -> str:
    """`4 vCPUs`, `1 vCPU`, `16GiB`: a quantity as a sentence reads it."""
    return format_bytes(v) if resource == "memory" else f"{v} vCPU{'s' if v != 1 else ''}"


class _Checker:
    def __init__(self, program: M.Program, catalog: Catalog) -> None:
        self.p = program
        self.cat = catalog
        self.diags: list[Diagnostic] = []

    def err(self, *a, **kw) -> None:
        self.diags.append(error(*a, **kw))

    def image(self, name: str, span) -> object | None:
        img = self.cat.get(name)
        if img is None and name not in self.cat.broken:
            self.err("F213", f"unknown image `{name}`", span, label="not in the image catalog",
                     help=did_you_mean(name, self.cat.ids()) or "`vmflow images` lists the known images")
        return img

    # -- VMs
    def vm(self, vm: M.VmSpec) -> None:
        img = self.image(vm.image, vm.image_span)
        for res, r in (("cpu", vm.cpu), ("memory", vm.memory)):
            if r.base > r.bound:
                self.err("F301", f"`{res}` starts above its bound: {_fmt(res, r.base)} > {_fmt(res, r.bound)}",
                         r.span, label="base > bound", help="write `base .. bound` with base <= bound")
                continue
            if r.base <= 0:
                self.err("F301", f"`{res}` must be above zero", r.span, label="zero")
                continue
            if img is not None:
                lo, hi = (img.cpu_min, img.cpu_max) if res == "cpu" else (img.memory_min, img.memory_max)
                if r.bound > hi:
                    self.err("F302", f"`{res}` bound {_fmt(res, r.bound)} is beyond image `{img.id}`'s maximum "
                             f"of {_fmt(res, hi)}", r.span, label=f"image allows at most {_fmt(res, hi)}",
                             labels=(Label(img.span, f"`{img.id}` sets its limits here"),))
                if r.base < lo:
                    self.err("F312", f"`{res}` {_fmt(res, r.base)} is below image `{img.id}`'s minimum of "
                             f"{_fmt(res, lo)}", r.span, label=f"image needs at least {_fmt(res, lo)}",
                             labels=(Label(img.span, f"`{img.id}` sets its limits here"),))
        for d in vm.disks:
            self.source(d)
        for m in vm.morphs:
            self.morph(vm, img, m)

    def source(self, d: M.DiskSpec) -> None:
        if d.source is not None:
            diag = check_source_path(d.source, d.source_span or d.span)
            if diag is not None:
                self.diags.append(diag)

    def morph(self, vm: M.VmSpec, img, m: M.MorphSpec, what: str | None = None) -> None:
        what = what or f"morph `{m.name}`"
        need = CAPABILITY.get(m.kind)
        if img is not None and need and not set(need) & img.capabilities:
            self.err("F304", f"{what} needs {_WORDS[need[0]]}, which image `{img.id}` does not support",
                     m.span, label=f"a {m.kind.value} morph",
                     help=f"use an image whose capabilities include `{need[0]}`",
                     labels=(Label(img.span, f"`{img.id}` declares its capabilities here"),))
        disks = {d.name for d in vm.disks}
        nics = {n.name for n in vm.nics}
        for other in vm.morphs:  # devices another morph attaches may be detached by this one
            for a in other.actions:
                if isinstance(a, M.AttachDiskAction):
                    disks.add(a.disk.name)
                elif isinstance(a, M.NicAction):
                    nics.add(a.nic.name)
        for a in m.actions:
            if isinstance(a, M.AdjustAction):
                self.adjust(vm, what, a)
            elif isinstance(a, M.DetachAction):
                known = disks if a.device == "disk" else nics
                if a.name not in known:
                    self.err("F201", f"vm `{vm.name}` has no {a.device} `{a.name}` to detach", a.span,
                             label=f"unknown {a.device}", help=did_you_mean(a.name, known))
            elif isinstance(a, M.AttachDiskAction):
                self.source(a.disk)
                declared = {d.name: d for d in vm.disks}
                if a.disk.name in declared:
                    self.err("F202", f"vm `{vm.name}` already has disk `{a.disk.name}`", a.disk.span,
                             label="attached again here",
                             labels=(Label(declared[a.disk.name].span, "declared on the vm here"),),
                             help="give the attached disk another name")
            elif isinstance(a, M.SwapImageAction):
                target = self.image(a.image, a.span)
                if target is not None:
                    for res, r in (("cpu", vm.cpu), ("memory", vm.memory)):
                        hi = target.cpu_max if res == "cpu" else target.memory_max
                        lo = target.cpu_min if res == "cpu" else target.memory_min
                        if r.base > hi or r.base < lo:
                            self.err("F302", f"vm `{vm.name}`'s {res} {_fmt(res, r.base)} does not fit image "
                                     f"`{target.id}` ({_fmt(res, lo)} .. {_fmt(res, hi)})", a.span,
                                     label="cannot swap to this image",
                                     labels=(Label(target.span, f"`{target.id}` sets its limits here"),))

    def adjust(self, vm: M.VmSpec, where: str, a: M.AdjustAction) -> None:
        r = vm.cpu if a.resource == "cpu" else vm.memory
        res = a.resource
        if a.op == "set":
            if not r.base <= a.amount <= r.bound and a.amount > r.bound:
                self.err("F305", f"{where} sets `{res}` to {_fmt(res, a.amount)}, beyond vm `{vm.name}`'s bound "
                         f"of {_fmt(res, r.bound)}", a.span, label="beyond the bound",
                         labels=(Label(r.span, "the bound is set here"),),
                         help=f"raise the bound (`{res} = {_fmt(res, r.base)} .. {_fmt(res, a.amount)}`) "
                         "or lower the target")
            elif a.amount <= 0:
                self.err("F305", f"{where} sets `{res}` to zero", a.span, label="zero")
            return
        if a.op == "add":
            if a.limit is not None and a.limit > r.bound:
                self.err("F305", f"{where} grows `{res}` up to {_fmt(res, a.limit)}, beyond vm `{vm.name}`'s bound "
                         f"of {_fmt(res, r.bound)}", a.span, label="`max` beyond the bound",
                         labels=(Label(r.span, "the bound is set here"),))
            elif r.base + a.amount > r.bound:
                self.err("F305", f"{where} adds {_fmt(res, a.amount)} `{res}` but vm `{vm.name}` may only grow "
                         f"from {_fmt(res, r.base)} to {_fmt(res, r.bound)}", a.span, label="can never apply",
                         labels=(Label(r.span, "the bound is set here"),),
                         help=f"raise the bound to at least {_fmt(res, r.base + a.amount)}")
        else:
            if a.limit is not None and a.limit <= 0:
                self.err("F305", f"{where} shrinks `{res}` down to zero", a.span, label="`min` must be above zero")
            elif a.amount >= r.bound:  # even from the bound it would reach zero
                self.err("F305", f"{where} removes {_fmt(res, a.amount)} `{res}`, more than vm `{vm.name}` can "
                         f"ever have", a.span, label="can never apply", labels=(Label(r.span, "sizes set here"),))

    # -- pools
    def pools(self) -> None:
        used: dict[str, list[M.VmSpec]] = {}
        only = next(iter(self.p.pools)) if len(self.p.pools) == 1 else None
        for vm in self.p.vms.values():
            pool = vm.pool or only
            if pool is not None:
                used.setdefault(pool, []).append(vm)
        for name, vms in used.items():
            pool = self.p.pools[name]
            for res, cap in (("cpu", pool.cpu), ("memory", pool.memory)):
                if cap is None:
                    continue
                for vm in vms:
                    r = vm.cpu if res == "cpu" else vm.memory
                    if r.bound > cap:
                        self.err("F303", f"vm `{vm.name}`'s {res} bound {_fmt(res, r.bound)} exceeds pool "
                                 f"`{name}`'s capacity of {_fmt(res, cap)}", r.span, label="larger than the pool",
                                 labels=(Label(pool.span, f"pool `{name}` declared here"),))
                total = sum((vm.cpu if res == "cpu" else vm.memory).base for vm in vms)
                if total > cap:
                    self.err("F303", f"pool `{name}` is over capacity: its VMs start with {_amount(res, total)}, "
                             f"it has {_amount(res, cap)}", pool.span, label="over capacity",
                             help="raise the pool's capacity, shrink the VMs or move some to another pool")
            if pool.disk is not None:
                disks = sum(d.size for vm in vms for d in vm.disks)
                if disks > pool.disk:
                    self.err("F303", f"pool `{name}` is over capacity: its VMs' disks need {format_bytes(disks)}, "
                             f"it has {format_bytes(pool.disk)}", pool.span, label="over capacity",
                             help="raise the pool's `disk`, shrink the disks or move some VMs to another pool")

    def morph_steps(self) -> None:
        """A morph run as a chain step is held to the same rules as a morph rule of its VM."""
        for c in self.p.chains.values():
            for s in c.steps:
                vm = self.p.vms.get(s.vm) if s.vm else None
                if vm is None or not s.actions:
                    continue
                kinds = resolve_kinds(s.actions)
                kind = next(iter(kinds)) if len(kinds) == 1 else None
                if kind is None:
                    self.err("F205", f"step `{s.name}` mixes {' and '.join(sorted(k.value for k in kinds))} actions",
                             s.span, label="one kind of change per step", help="split it into one step per kind")
                    continue
                spec = M.MorphSpec(vm.name, s.name, kind, M.AllOf((), s.span), s.actions, None, None, s.span)
                self.morph(vm, self.cat.get(vm.image), spec, what=f"step `{s.name}`")

    # -- chains
    def chain(self, c: M.ChainSpec) -> None:
        steps = {s.name: s for s in c.steps}
        # A chain has a handful of steps: plain dicts answer reachability faster than a NetworkX graph, which
        # is built only to name the cycle of a chain that has one.
        succ: dict[str, dict[str, None]] = {n: {} for n in steps}
        pred: dict[str, dict[str, None]] = {n: {} for n in steps}
        edge_span = {}
        for e in c.edges:
            succ.setdefault(e.src, {})[e.dst] = None
            pred.setdefault(e.dst, {})[e.src] = None
            succ.setdefault(e.dst, {})
            pred.setdefault(e.src, {})
            edge_span.setdefault((e.src, e.dst), e.span)
        images = {}
        for s in c.steps:
            if s.image is not None:
                images[s.name] = self.image(s.image, s.image_span)
            if s.replicas is not None and s.replicas.base > s.replicas.bound:
                self.err("F301", f"step `{s.name}` replicas start above their bound", s.replicas.span,
                         label="base > bound")
        if _has_cycle(succ):
            g = nx.DiGraph()
            g.add_nodes_from(steps)
            g.add_edges_from((e.src, e.dst) for e in c.edges)
            cycle = nx.find_cycle(g)
            path = [u for u, _ in cycle] + [cycle[0][0]]
            self.err("F308", f"chain `{c.name}` has a cycle: {' -> '.join(path)}", edge_span[cycle[-1]],
                     label="this edge closes the cycle", help="a chain is a DAG: break the cycle, or use `retry`")
            return
        start = c.steps[0].name
        reach = {start} | _reachable(succ, start)
        for s in c.steps:  # error handlers are entered on failure, and lead on from there
            if s.on_error:
                reach |= {s.on_error} | _reachable(succ, s.on_error)
        if c.on_error:
            reach |= {c.on_error} | _reachable(succ, c.on_error)
        for s in c.steps:
            if s.name not in reach:
                self.err("F309", f"step `{s.name}` is unreachable from `{start}`, where chain `{c.name}` starts",
                         s.span, label="no edge leads here", help=f"add an edge such as `{start} -> {s.name}`")
        # An error handler runs after whichever step failed: it may read what any other step produced.
        handlers = {s.on_error for s in c.steps if s.on_error} | ({c.on_error} if c.on_error else set())
        for s in c.steps:
            img = images.get(s.name)
            ports_in = {p.name: p for p in img.inputs} if img else None
            ports_out = {p.name: p for p in img.outputs} if img else None
            for word, mine, theirs in (("input", s.inputs, ports_in), ("output", s.outputs, ports_out)):
                if theirs is None:
                    continue
                for p in mine:
                    if p.name not in theirs:
                        self.err("F307", f"image `{img.id}` has no {word} `{p.name}`", p.span,
                                 label=f"not an {word} of `{img.id}`",
                                 help=did_you_mean(p.name, theirs) or
                                 f"its {word}s: {', '.join(theirs) or 'none'}")
            ancestors = _reachable(pred, s.name) if s.name not in handlers else set(steps) - {s.name}
            for p in s.inputs:
                producers = [a for a in ancestors if p.name in {o.name for o in steps[a].outputs}]
                if not producers:
                    self.err("F306", f"input `{p.name}` of step `{s.name}` is produced by no step before it",
                             p.span, label="nothing upstream produces this",
                             help=did_you_mean(p.name, {o.name for a in ancestors for o in steps[a].outputs}))
                    continue
                if img is None or p.name not in ports_in:
                    continue
                want = ports_in[p.name]
                for a in producers:
                    pimg = images.get(a)
                    have = {o.name: o for o in pimg.outputs}.get(p.name) if pimg else None
                    if have is None:
                        continue
                    if have.type != want.type or (have.format and want.format and have.format != want.format):
                        self.err("F307", f"`{p.name}` is {have.type}"
                                 f"{f' ({have.format})' if have.format else ''} from step `{a}` but step `{s.name}` "
                                 f"expects {want.type}{f' ({want.format})' if want.format else ''}", p.span,
                                 label="type mismatch",
                                 labels=(Label(have.span, f"`{pimg.id}` produces it as {have.type}"),
                                         Label(want.span, f"`{img.id}` expects {want.type}")))
        for e in c.edges:
            if e.condition is None:
                continue
            available = {o.name for a in _reachable(pred, e.dst) | {e.src} for o in steps[a].outputs}
            for ref in _data_refs(e.condition):
                if ref.name not in available:
                    self.err("F306", f"branch condition reads `{ref.name}`, which no step before `{e.dst}` produces",
                             ref.span, label="not produced upstream", help=did_you_mean(ref.name, available))


def _reachable(adjacent: dict[str, dict[str, None]], node: str) -> set[str]:
    """The nodes reachable from `node` through `adjacent`, without `node` itself (as NetworkX's
    `descendants` and, given predecessors, `ancestors`)."""
    seen: set[str] = set()
    todo = [node]
    while todo:
        for n in adjacent[todo.pop()]:
            if n not in seen:
                seen.add(n)
                todo.append(n)
    seen.discard(node)
    return seen


def _has_cycle(succ: dict[str, dict[str, None]]) -> bool:
    """Kahn's algorithm: a graph is acyclic when every node can be removed once its predecessors are."""
    indegree = dict.fromkeys(succ, 0)
    for targets in succ.values():
        for n in targets:
            indegree[n] += 1
    free = [n for n, d in indegree.items() if d == 0]
    removed = 0
    while free:
        removed += 1
        for n in succ[free.pop()]:
            indegree[n] -= 1
            if indegree[n] == 0:
                free.append(n)
    return removed < len(succ)


def _data_refs(c: M.Condition):
    if isinstance(c, M.Cmp):
        for o in (c.left, c.right):
            if isinstance(o, M.DataRef):
                yield o
    elif isinstance(c, (M.AllOf, M.AnyOf)):
        for i in c.items:
            yield from _data_refs(i)
    elif isinstance(c, M.Negate):
        yield from _data_refs(c.item)


def check_vm(vm: M.VmSpec, catalog: Catalog) -> list[Diagnostic]:
    """The checks of one VM against the catalog (cacheable per file: they read no other block)."""
    c = _Checker(M.Program(), catalog)
    c.vm(vm)
    return c.diags


def check_chain(chain: M.ChainSpec, catalog: Catalog) -> list[Diagnostic]:
    c = _Checker(M.Program(), catalog)
    c.chain(chain)
    return c.diags


def check_program(program: M.Program, catalog: Catalog) -> list[Diagnostic]:
    """The checks that read several blocks at once (pool capacity, morph steps against their VMs)."""
    c = _Checker(program, catalog)
    c.pools()
    c.morph_steps()
    return c.diags


def validate(program: M.Program, catalog: Catalog) -> list[Diagnostic]:
    c = _Checker(program, catalog)
    for vm in program.vms.values():
        c.vm(vm)
    for ch in program.chains.values():
        c.chain(ch)
    c.pools()
    c.morph_steps()
    return c.diags
