"""Hypothesis strategies for `.flow` source text: random programs that the grammar accepts.

Shared by the property tests of the parser, the formatter and later stages. Everything here builds text,
never AST nodes, so a test can feed it straight to `compiler.parser.parse`. Every construct of
grammar/flow.lark is reachable: imports, pools, vms with attributes, disks, nics and morphs (every action
kind, the trailing `} cooldown 10m` form), chains with steps, morph steps, `in`/`out` and edges,
templates with parameters and defaults, `use`, `reserve`, and the whole expression grammar.

Public strategies (all produce `str`):

- `programs(layout=..., comments=..., max_items=...)`: a whole file. `layout="tidy"` puts one item a
  line; `"messy"` picks any whitespace between tokens, gluing them where the lexer still splits them the
  same way; `"any"` (the default) draws one of the two. `comments=True` adds `#` and `//` comments, on
  their own lines and at ends of lines: in tidy files mostly between items, in messy ones between any two
  tokens (inside expressions and block headers too).
- `expressions()`, `conditions()`: one expression (`conditions` leans towards comparisons and `and`/`or`).
- `names()`, `quantities()`, `strings()`, `comments()`: single tokens.

Generated names never spell a keyword (`KEYWORDS`): the lexer is contextual, so a keyword is sometimes a
valid name, but not everywhere, and a generator that tracked where would be as complex as the grammar. The
one exception is the grammar's own: attributes may be named `disk` or `nic`.

Import it as `from strategies import programs` (pytest puts `tests/` on `sys.path` for the tests in it).
"""

from __future__ import annotations

import random
from functools import lru_cache

from hypothesis import strategies as st

__all__ = [
    "KEYWORDS",
    "comments",
    "conditions",
    "expressions",
    "names",
    "programs",
    "quantities",
    "strings",
]

# Every word the grammar spells out: the quoted strings of its rules and its keyword terminals.
KEYWORDS = frozenset({
    "import", "pool", "vm", "disk", "nic", "morph", "when", "attach", "detach", "swap", "image",
    "cooldown", "revert", "chain", "step", "template", "as", "use", "reserve", "or", "and", "not", "for",
    "running", "max", "min", "in", "out",
})

# Names a real program would use, so that examples read like one (and shrink to something familiar).
_COMMON_NAMES = (
    "web", "db", "cpu", "memory", "size", "network", "default", "ubuntu-24.04", "disk.read", "param.workers",
    "self", "x", "a", "b", "etl", "lan", "data", "pool_1", "_tmp", "avg", "app",
)

# An item boundary in a piece list: a newline in the tidy layout, any whitespace in the messy one.
_BREAK = None

_SPACE_CHOICES = (" ", "  ", "\t", "\n", "\n\n", "\n    ", " \n\t ", "\r\n")

_COMMENT_STARTS = ("#", "//", "# ", "// ")
_COMMENT_CHARS = "".join(chr(c) for c in range(0x20, 0x7F)) + "\téλ→日"


# ------------------------------------------------------------------------------------------ tokens


@lru_cache(maxsize=None)
def names() -> st.SearchStrategy[str]:
    """A NAME: word characters, with `.` or `-` between parts (`ubuntu-24.04`, `disk.read`)."""
    part = st.text("abcxyzAZ0189_", min_size=1, max_size=4)
    generated = st.builds(
        lambda head, rest, tail: head + rest + "".join(sep + p for sep, p in tail),
        st.sampled_from("abcdefghijklmnopqrstuvwxyzAZ_"),
        st.text("abcdefghijklmnopqrstuvwxyz0123456789_", max_size=5),
        st.lists(st.tuples(st.sampled_from(".-"), part), max_size=2),
    )
    return st.one_of(st.sampled_from(_COMMON_NAMES), generated).filter(lambda n: n not in KEYWORDS)


@lru_cache(maxsize=None)
def quantities() -> st.SearchStrategy[str]:
    """A number with its unit glued on: `2`, `1.5`, `4GiB`, `80%`, `10m`, `50MB/s`."""
    number = st.one_of(
        st.integers(0, 100_000).map(str),
        st.builds(lambda a, b: f"{a}.{b}", st.integers(0, 999), st.integers(0, 99)),
    )
    unit = st.sampled_from(("", "", "GiB", "MiB", "GB", "%", "s", "m", "h", "d", "MB/s", "x", "Ki%"))
    return st.builds(str.__add__, number, unit)


@lru_cache(maxsize=None)
def strings() -> st.SearchStrategy[str]:
    """A double-quoted string as written in source, escapes included."""
    char = st.one_of(
        st.sampled_from("abc XYZ019-_./:{}#"),
        st.sampled_from(('\\"', "\\\\", "\\n", "\\t", "\t", "é", "日", "😍")),
        st.characters(codec="utf-8", exclude_categories=("Cs", "Cc"), exclude_characters='"\\\u2028\u2029'),
    )
    return st.lists(char, max_size=6).map(lambda cs: '"' + "".join(cs) + '"')


@lru_cache(maxsize=None)
def comments() -> st.SearchStrategy[str]:
    """A comment, `#` or `//`, with no line break in it (trailing spaces allowed: the lexer keeps them)."""
    return st.builds(str.__add__, st.sampled_from(_COMMENT_STARTS), st.text(_COMMENT_CHARS, max_size=16))


# ------------------------------------------------------------------------------------------ pieces
#
# Generators below return piece lists: token strings and `_BREAK` markers. `_render` turns a piece list
# into text, choosing the whitespace and comments.


# Counts with a heavy lean towards one: an expression tree's size is the product of its fan-outs.
_ONE_MOSTLY = st.sampled_from((1, 1, 1, 1, 2, 3))
_ZERO_MOSTLY = st.sampled_from((0, 0, 0, 0, 1, 2))
_CMP = st.sampled_from((">", "<", ">=", "<=", "==", "!="))


@lru_cache(maxsize=None)
@st.composite
def _operand(draw, depth: int) -> list:
    kind = draw(st.sampled_from((0, 0, 1, 2, 2, 3) if depth > 0 else (0, 0, 1, 2, 2)))
    if kind == 0:
        return [draw(quantities())]
    if kind == 1:
        return [draw(strings())]
    if kind == 2:
        return [draw(names())]
    return draw(_call(depth))


@lru_cache(maxsize=None)
@st.composite
def _call(draw, depth: int) -> list:
    args = [draw(_expr(depth - 1)) for _ in range(draw(_ZERO_MOSTLY))] if depth > 0 else []
    return [draw(names()), "(", *_join(args, ","), ")"]


@lru_cache(maxsize=None)
@st.composite
def _primary(draw, depth: int) -> list:
    kind = draw(st.sampled_from((0, 0, 0, 1, 1, 2, 3, 4, 5) if depth > 0 else (0, 0, 0, 1, 1, 2, 3)))
    if kind == 0:
        return draw(_operand(depth))
    if kind == 1:  # comparison, with an optional window
        out = [*draw(_operand(depth - 1)), draw(_CMP), *draw(_operand(depth - 1))]
        if draw(st.booleans()):
            out += ["for", draw(quantities())]
        return out
    if kind == 2:
        return [*draw(_operand(depth - 1)), "..", *draw(_operand(depth - 1))]
    if kind == 3:  # app("x") [not] running
        call = ["app", "(", draw(strings()), ")"] if draw(st.booleans()) else draw(_call(min(depth, 1)))
        return [*call, *(["not"] if draw(st.booleans()) else []), "running"]
    if kind == 4:
        return ["(", *draw(_expr(depth - 1)), ")"]
    return ["[", *_join([draw(_expr(depth - 1)) for _ in range(draw(_ZERO_MOSTLY))], ","), "]"]


@lru_cache(maxsize=None)
@st.composite
def _not(draw, depth: int) -> list:
    return ["not"] * draw(_ZERO_MOSTLY) + draw(_primary(depth))


@lru_cache(maxsize=None)
@st.composite
def _and(draw, depth: int) -> list:
    return _join([draw(_not(depth)) for _ in range(draw(_ONE_MOSTLY))], "and")


@lru_cache(maxsize=None)
@st.composite
def _expr(draw, depth: int = 2) -> list:
    return _join([draw(_and(depth)) for _ in range(draw(_ONE_MOSTLY))], "or")


@lru_cache(maxsize=None)
@st.composite
def _condition(draw, depth: int = 2) -> list:
    if draw(st.booleans()):
        return draw(_expr(depth))
    out = [*draw(_operand(1)), draw(_CMP), *draw(_operand(1))]
    if draw(st.booleans()):
        out += ["for", draw(quantities())]
    return out


def _join(parts: list[list], sep: str) -> list:
    out: list = []
    for k, part in enumerate(parts):
        if k:
            out.append(sep)
        out.extend(part)
    return out


def _block(head: list, children: list[list]) -> list:
    out = [*head, "{"]
    for child in children:
        out += [_BREAK, *child]
    if children:
        out.append(_BREAK)
    return out + ["}"]


@lru_cache(maxsize=None)
@st.composite
def _attr(draw) -> list:
    # `disk` and `nic` are keywords the grammar also takes as attribute names (a pool's `disk` capacity).
    name = draw(st.sampled_from(("disk", "nic"))) if draw(st.integers(0, 9)) == 0 else draw(names())
    return [name, "=", *draw(_expr(2 if draw(st.integers(0, 3)) == 0 else 1))]


def _attrs(max_size: int = 4) -> st.SearchStrategy[list[list]]:
    return st.lists(_attr(), max_size=max_size)


@lru_cache(maxsize=None)
@st.composite
def _morph_item(draw) -> list:
    kind = draw(st.integers(0, 6))
    if kind == 0:  # cpu += 2 max 8 / memory -= 1GiB min 2GiB / memory = 8GiB
        out = [draw(names()), draw(st.sampled_from(("+=", "-=", "="))), *draw(_expr(1))]
        if draw(st.booleans()):
            out += [draw(st.sampled_from(("max", "min"))), *draw(_expr(1))]
        return out
    if kind == 1:
        return _block(["attach", "disk", draw(names())], draw(_attrs(2)))
    if kind == 2:
        return ["detach", draw(st.sampled_from(("disk", "nic"))), draw(names())]
    if kind == 3:
        return ["swap", "image", draw(names())]
    if kind == 4:
        return _block(["nic", draw(names())], draw(_attrs(2)))
    if kind == 5:
        return ["cooldown", *draw(st.one_of(quantities().map(lambda q: [q]), _expr(1)))]
    return ["revert", "when", *draw(_condition())]


@lru_cache(maxsize=None)
@st.composite
def _morph(draw) -> list:
    out = _block(["morph", draw(names()), "when", *draw(_condition())],
                 draw(st.lists(_morph_item(), max_size=4)))
    if draw(st.booleans()):  # the trailing form: `} cooldown 10m`
        out += ["cooldown", *draw(st.one_of(quantities().map(lambda q: [q]), _expr(1)))]
    return out


@lru_cache(maxsize=None)
@st.composite
def _vm(draw) -> list:
    item = st.one_of(
        _attr(),
        st.builds(lambda n, a: _block(["disk", n], a), names(), _attrs(2)),
        st.builds(lambda n, a: _block(["nic", n], a), names(), _attrs(2)),
        _morph(),
    )
    return _block(["vm", draw(names())], draw(st.lists(item, max_size=5)))


@lru_cache(maxsize=None)
@st.composite
def _io(draw) -> list:
    return [draw(st.sampled_from(("in", "out"))), *_join([[n] for n in draw(st.lists(names(), min_size=1,
                                                                                       max_size=3))], ",")]


@lru_cache(maxsize=None)
@st.composite
def _edge(draw) -> list:
    out = _join([[n] for n in draw(st.lists(names(), min_size=2, max_size=4))], "->")
    if draw(st.booleans()):
        out += ["when", *draw(_condition())]
    return out


@lru_cache(maxsize=None)
@st.composite
def _chain(draw) -> list:
    step = st.builds(lambda n, img, items: _block(["step", n, "=", img], items),
                     names(), names(), st.lists(st.one_of(_attr(), _io()), max_size=4))
    morph_step = st.builds(lambda n, vm, items: _block(["step", n, "=", "morph", vm], items),
                           names(), names(), st.lists(_morph_item(), max_size=3))
    items = draw(st.lists(st.one_of(_attr(), step, morph_step, _edge()), max_size=5))
    return _block(["chain", draw(names())], items)


@lru_cache(maxsize=None)
@st.composite
def _template(draw, depth: int) -> list:
    param = st.builds(lambda n, d: [n, *(["=", *d] if d else [])],
                      names(), st.one_of(st.just(None), _expr(1)))
    params = draw(st.lists(param, max_size=3))
    items = draw(st.lists(_top_item(depth - 1), max_size=3))
    return _block(["template", draw(names()), "(", *_join(params, ","), ")"], items)


@lru_cache(maxsize=None)
@st.composite
def _top_item(draw, depth: int = 1) -> list:
    kind = draw(st.integers(0, 7 if depth > 0 else 6))
    if kind == 0:
        return ["import", draw(strings())]
    if kind == 1:
        return _block(["pool", draw(names())], draw(_attrs()))
    if kind == 2:
        return draw(_vm())
    if kind == 3:
        return draw(_chain())
    if kind == 4:
        return _block(["use", draw(names()), "as", draw(names())], draw(_attrs()))
    if kind == 5:
        return _block(["reserve", draw(names())], draw(_attrs()))
    if kind == 6:
        return draw(_vm())
    return draw(_template(depth))


# ------------------------------------------------------------------------------------------ rendering


def _wordish(token: str) -> bool:
    # Names, numbers and keywords: two of them side by side need whitespace to stay two tokens
    # (`80%` counts: the unit would swallow a following name).
    return token[0].isalnum() or token[0] == "_"


def _tight(prev: str, token: str) -> bool:
    """Whether the tidy layout writes these two tokens without a space (as people usually do)."""
    if token in (",", ")", "]") or prev in ("(", "[") or (prev, token) == ("{", "}"):
        return True
    return token == "(" and _wordish(prev) and prev not in KEYWORDS


# Layout draws a seed and takes every whitespace and comment choice from it: drawing each gap from
# Hypothesis costs more than generating the program itself, and shrinking the structure is what makes a
# failing example small. How many comments there are stays a Hypothesis choice so that it can shrink to none.


@st.composite
def _render(draw, pieces: list, layout: str, with_comments: bool) -> str:
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    comment_rate = draw(st.sampled_from((0.0, 0.03, 0.1, 0.3))) if with_comments else 0.0
    return _lay_out(rnd, pieces, layout, comment_rate)


def _lay_out(rnd: random.Random, pieces: list, layout: str, comment_rate: float) -> str:
    out: list[str] = []
    depth = 0
    pending_break = False
    prev: str | None = None
    for piece in pieces:
        if piece is _BREAK:
            pending_break = True
            continue
        if piece == "}":
            depth -= 1
        if prev is None:
            if layout == "messy":
                out.append(rnd.choice(("", "\n", " ", "\n\n")))
            if rnd.random() < comment_rate:
                out.append(_comment_lines(rnd, 0))
        else:
            out.append(_gap(rnd, prev, piece, layout, pending_break, depth, comment_rate))
        out.append(piece)
        if piece == "{":
            depth += 1
        prev = piece
        pending_break = False
    if rnd.random() < comment_rate:
        out.append(rnd.choice((" ", "\n", "\n\n", "")) + _comment(rnd))
    out.append(rnd.choice(("\n", "", "\n\n", " \n")) if layout == "messy" else "\n")
    return "".join(out)


def _comment(rnd: random.Random) -> str:
    body = "".join(rnd.choice(_COMMENT_CHARS) for _ in range(rnd.randrange(12)))
    return rnd.choice(_COMMENT_STARTS) + body


def _comment_lines(rnd: random.Random, depth: int) -> str:
    return "".join("  " * depth + _comment(rnd) + rnd.choice(("\n", "\n", "\n\n"))
                   for _ in range(rnd.choice((1, 1, 2))))


def _gap(rnd: random.Random, prev: str, token: str, layout: str, item_break: bool, depth: int,
         comment_rate: float) -> str:
    """The text between two tokens: whitespace, perhaps with a comment in it."""
    if layout == "tidy":
        if item_break:
            space = rnd.choice(("\n", "\n", "\n\n")) + "  " * depth
        else:
            space = "" if _tight(prev, token) else " "
    else:
        choices = _SPACE_CHOICES if _wordish(prev) and _wordish(token) else ("",) + _SPACE_CHOICES
        space = rnd.choice(choices)
    if rnd.random() >= comment_rate:
        return space
    # Tidy files get comments where people put them (between items); messy ones get them anywhere.
    if layout == "tidy" and not item_break and rnd.random() < 0.8:
        return space
    if rnd.random() < 0.5:  # end of line: the comment runs to the newline that follows it
        return rnd.choice((" ", "", "   ")) + _comment(rnd) + "\n" + "  " * depth
    return "\n" + rnd.choice(("", "\n")) + _comment_lines(rnd, depth) + "  " * depth


# ------------------------------------------------------------------------------------------ public


def programs(layout: str = "any", comments: bool = True, max_items: int = 5) -> st.SearchStrategy[str]:
    """A whole `.flow` file that parses. See the module docstring for `layout` and `comments`."""
    if layout not in ("any", "tidy", "messy"):
        raise ValueError(f"layout must be 'any', 'tidy' or 'messy', not {layout!r}")
    layouts = st.sampled_from(("tidy", "messy")) if layout == "any" else st.just(layout)

    @st.composite
    def program(draw) -> str:
        items = draw(st.lists(_top_item(), max_size=max_items))
        pieces: list = []
        for item in items:
            if pieces:
                pieces.append(_BREAK)
            pieces += item
        if not pieces:  # an empty file, or one holding only comments
            seed = draw(st.integers(0, 2**32 - 1))
            return _comment_lines(random.Random(seed), 0) if comments and seed % 2 else ""
        return draw(_render(pieces, draw(layouts), comments))

    return program()


def expressions(max_depth: int = 2, layout: str = "tidy") -> st.SearchStrategy[str]:
    """One expression: any value or condition the grammar accepts, nested up to `max_depth`."""
    return _text(_expr(max_depth), layout)


def conditions(max_depth: int = 2, layout: str = "tidy") -> st.SearchStrategy[str]:
    """One expression leaning towards what a `when` holds: comparisons (with windows) and their logic."""
    return _text(_condition(max_depth), layout)


def _text(pieces: st.SearchStrategy[list], layout: str) -> st.SearchStrategy[str]:
    return pieces.flatmap(lambda p: _render(p, layout, False)).map(str.strip)
