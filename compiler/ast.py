"""The syntax tree of a `.flow` file: what the parser (compiler/parser.py) builds and the resolver reads.

One frozen, slotted dataclass per construct; children are tuples; every node carries a `Span` (character
offsets into its file). The tree keeps the source order of block items and the user's parentheses so that
the formatter (compiler/fmt.py) can print it back faithfully. Units are not interpreted here: a `Quantity`
keeps its number and its unit as written, and the resolver decides what they mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Union


class Span(NamedTuple):
    """Where a node sits: file path (as given to the compiler) and [start, end) character offsets."""

    file: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Name:
    """An identifier as written, with its own span (diagnostics point at names, not whole blocks)."""

    value: str
    span: Span


# ------------------------------------------------------------------------------------------ expressions


@dataclass(frozen=True, slots=True)
class Quantity:
    """A number with an optional glued unit: `32`, `4GiB`, `80%`, `5m`, `50MB/s`."""

    text: str
    number: str
    unit: str
    span: Span


@dataclass(frozen=True, slots=True)
class String:
    """A double-quoted string; `value` has escapes resolved, `text` is the source form."""

    value: str
    text: str
    span: Span


@dataclass(frozen=True, slots=True)
class Ref:
    """A bare name used as a value: a pool, an image id, a metric, a data name, `param.x`."""

    name: str
    span: Span


@dataclass(frozen=True, slots=True)
class Call:
    """`name(args)`: a condition function (`avg(cpu, 10m)`), a health probe (`port(80)`), a fallback."""

    name: Name
    args: tuple[Expr, ...]
    span: Span
    depth: int = 1


@dataclass(frozen=True, slots=True)
class Compare:
    """`left OP right [for WINDOW]`: true when the comparison holds (at every sample across the window)."""

    left: Expr
    op: str
    right: Expr
    window: Quantity | None
    span: Span
    depth: int = 1


@dataclass(frozen=True, slots=True)
class Range:
    """`base .. bound`: start at base; morphs may grow up to bound."""

    low: Expr
    high: Expr
    span: Span
    depth: int = 1


@dataclass(frozen=True, slots=True)
class AppRunning:
    """`app("nginx") running` or `app("nginx") not running`."""

    call: Call
    negated: bool
    span: Span
    depth: int = 1


@dataclass(frozen=True, slots=True)
class BoolOp:
    """`a and b and c` / `a or b`: operands flattened so long chains do not nest."""

    op: str
    operands: tuple[Expr, ...]
    span: Span
    depth: int = 1


@dataclass(frozen=True, slots=True)
class Not:
    operand: Expr
    span: Span
    depth: int = 1


@dataclass(frozen=True, slots=True)
class Group:
    """Parentheses as the user wrote them (kept for the formatter; meaningless to the resolver)."""

    inner: Expr
    span: Span
    depth: int = 1


@dataclass(frozen=True, slots=True)
class ListExpr:
    items: tuple[Expr, ...]
    span: Span
    depth: int = 1


@dataclass(frozen=True, slots=True)
class Invalid:
    """Stands in for an expression the parser refused (nested too deep); a diagnostic was already made."""

    span: Span
    depth: int = 1


Expr = Union[Quantity, String, Ref, Call, Compare, Range, AppRunning, BoolOp, Not, Group, ListExpr, Invalid]


# ------------------------------------------------------------------------------------------ block items


@dataclass(frozen=True, slots=True)
class Attr:
    """`name = value`, one fact a line."""

    name: Name
    value: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Disk:
    """`disk NAME { size = 20GiB ... }` inside a vm, or `attach disk NAME { ... }` in a morph."""

    name: Name
    attrs: tuple[Attr, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Nic:
    """`nic NAME { network = "default" ... }` inside a vm, or in a morph (network reconfiguration)."""

    name: Name
    attrs: tuple[Attr, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Adjust:
    """`cpu += 2 max 8`, `memory -= 1GiB min 2GiB`, `memory = 8GiB`: a resource morph action."""

    target: Name
    op: str
    value: Expr
    limit_kind: str | None
    limit: Expr | None
    span: Span


@dataclass(frozen=True, slots=True)
class AttachDisk:
    disk: Disk
    span: Span


@dataclass(frozen=True, slots=True)
class Detach:
    """`detach disk NAME` / `detach nic NAME`."""

    device: str
    name: Name
    span: Span


@dataclass(frozen=True, slots=True)
class SwapImage:
    """`swap image IMAGE`: OS swap, keeping UUID, MACs and data disks."""

    image: Name
    span: Span


@dataclass(frozen=True, slots=True)
class Cooldown:
    value: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Revert:
    """`revert when COND`: the way back once the condition clears."""

    when: Expr
    span: Span


MorphItem = Union[Adjust, AttachDisk, Detach, SwapImage, Nic, Cooldown, Revert]


@dataclass(frozen=True, slots=True)
class Morph:
    """`morph NAME when COND { actions and clauses }`."""

    name: Name
    when: Expr
    items: tuple[MorphItem, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Pool:
    name: Name
    attrs: tuple[Attr, ...]
    span: Span


VmItem = Union[Attr, Disk, Nic, Morph]


@dataclass(frozen=True, slots=True)
class Vm:
    name: Name
    items: tuple[VmItem, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Io:
    """`in a, b` / `out c`: named data a step consumes or produces."""

    direction: str
    names: tuple[Name, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Step:
    """`step NAME = IMAGE { in/out, attrs }`: one service image run as a workflow step."""

    name: Name
    image: Name
    items: tuple[Union[Attr, Io], ...]
    span: Span


@dataclass(frozen=True, slots=True)
class MorphStep:
    """`step NAME = morph VM { actions }`: a morph action run as a workflow step."""

    name: Name
    vm: Name
    items: tuple[MorphItem, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Edge:
    """`a -> b -> c [when COND]`: control and data flow between steps; conditional when `when` is set."""

    path: tuple[Name, ...]
    when: Expr | None
    span: Span


ChainItem = Union[Attr, Step, MorphStep, Edge]


@dataclass(frozen=True, slots=True)
class Chain:
    name: Name
    items: tuple[ChainItem, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Reserve:
    name: Name
    attrs: tuple[Attr, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Param:
    name: Name
    default: Expr | None
    span: Span


@dataclass(frozen=True, slots=True)
class Template:
    """`template NAME(params) { blocks }`; a block named `self` takes the instance's name."""

    name: Name
    params: tuple[Param, ...]
    items: tuple[TopItem, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Use:
    """`use TEMPLATE as NAME { param = value ... }`: one instance of a template."""

    template: Name
    name: Name
    attrs: tuple[Attr, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Import:
    """`import "path"`: another file or directory (relative to this file) joins the program."""

    path: String
    span: Span


TopItem = Union[Import, Pool, Vm, Chain, Template, Use, Reserve]


@dataclass(frozen=True, slots=True)
class Comment:
    text: str
    span: Span


@dataclass(frozen=True, slots=True)
class FileAst:
    """One parsed file: its items in source order and its comments (for the formatter)."""

    path: str
    items: tuple[TopItem, ...]
    comments: tuple[Comment, ...]
