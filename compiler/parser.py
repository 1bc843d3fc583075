"""Source text -> `FileAst`: the only module that sees Lark.

The grammar (grammar/flow.lark) is loaded once per process with the LALR parser, and each rule's
reduction calls a builder method directly, so no parse tree is ever built: each rule reduces straight into
its AST node. lark-cython replaces the lexer and the LALR loop when it is installed. Syntax errors become
F1xx diagnostics that say, in words, what was expected; the Lark tree and Lark's exceptions never leave this
module.
"""

from __future__ import annotations

import re
from functools import lru_cache
from operator import itemgetter

from lark import Lark
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken
from lark.grammar import Rule

import grammar
from compiler import ast as A
from compiler.diagnostics import Diagnostic, did_you_mean, error

# Conditions and values nest; deeper than this is refused with F105 rather than risking recursion in
# later stages (the LALR parser itself is iterative and would take any depth).
MAX_DEPTH = 64

# A program is text a person reviews; past this a file is refused before it is lexed (F106).
MAX_FILE_BYTES = 64 * 1024 * 1024

# A QUANTITY token is a number then a unit made of these (grammar/flow.lark): the unit is what they strip.
_UNIT_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz%/"

# How regex terminals read in "expected ..." messages; literal terminals show as themselves.
_TERMINAL_WORDS = {
    "NAME": "a name",
    "QUANTITY": "a number",
    "STRING": "a string",
    "CMP": "a comparison (`>`, `<`, `>=`, `<=`, `==`, `!=`)",
    "ADJUST_OP": "`+=` or `-=`",
    "$END": "end of file",
}

_UNITS = {"B", "KiB", "MiB", "GiB", "TiB", "KB", "MB", "GB", "TB", "ms", "s", "m", "h", "d"}

_SPACED_UNIT = re.compile(r"([0-9][0-9.]*)\s+(" + "|".join(sorted(_UNITS, key=len, reverse=True)) + r")$")

_TOP_KEYWORDS = ("import", "pool", "vm", "chain", "template", "use", "reserve")


# Spans are built as the tuples they are: `A.Span(...)` goes through the named tuple's Python `__new__`, which
# costs twice as much, and the parser builds one for every node and name.
_new_tuple = tuple.__new__
_Span = A.Span


def _depth(*children) -> int:
    return 1 + max((getattr(c, "depth", 0) for c in children if c is not None), default=0)


class _ToAst:
    """Builds AST nodes during the LALR reductions: one method per rule (or alias), called with the rule's
    children as Lark's inline transformer would pass them (anonymous tokens dropped, `_rules` spliced in,
    None for an absent `[optional]`). `file` is set before each parse.

    Tokens come from Lark or from lark-cython (a different class, not a str): they are read by attribute only
    (`value`, `start_pos`, `end_pos`). Each method knows which of its children are tokens and which are nodes,
    so a span is taken straight from the right attribute.
    """

    def __init__(self) -> None:
        self.file = ""
        self.too_deep: list[A.Span] = []

    # -- helpers
    def _name(self, tok) -> A.Name:
        return A.Name(tok.value, _new_tuple(_Span, (self.file, tok.start_pos, tok.end_pos)))

    def _limit(self, node):
        if node.depth <= MAX_DEPTH:
            return node
        if not self.too_deep:
            self.too_deep.append(node.span)
        return A.Invalid(node.span)

    # -- program
    def start(self, *items):
        return items

    def import_decl(self, tok):
        s = self.string(tok)
        return A.Import(s, s.span)

    def attr(self, name, value):
        file = self.file
        return A.Attr(A.Name(name.value, _new_tuple(_Span, (file, name.start_pos, name.end_pos))), value,
                      _new_tuple(_Span, (file, name.start_pos, value.span.end)))

    def _block(self, cls, name, rest):
        """`KEYWORD NAME { items }`: rest is the items then the closing brace."""
        file = self.file
        start = name.start_pos
        return cls(A.Name(name.value, _new_tuple(_Span, (file, start, name.end_pos))), rest[:-1],
                   _new_tuple(_Span, (file, start, rest[-1].end_pos)))

    def pool(self, name, *rest):
        return self._block(A.Pool, name, rest)

    def vm(self, name, *rest):
        return self._block(A.Vm, name, rest)

    def disk(self, name, *rest):
        return self._block(A.Disk, name, rest)

    def nic(self, name, *rest):
        return self._block(A.Nic, name, rest)

    def morph(self, name, when, *rest):
        trailing = rest[-1]
        items = rest[:-2]
        if trailing is None:
            end = rest[-2].end_pos
        else:
            items = items + (trailing,)
            end = trailing.span.end
        return A.Morph(self._name(name), when, items, _new_tuple(_Span, (self.file, name.start_pos, end)))

    def adjust(self, target, op, value, limit_kind, limit):
        end = limit.span.end if limit is not None else value.span.end
        return A.Adjust(self._name(target), op.value, value, limit_kind.value if limit_kind else None, limit,
                        _new_tuple(_Span, (self.file, target.start_pos, end)))

    def attach_disk(self, name, *rest):
        disk = self._block(A.Disk, name, rest)
        return A.AttachDisk(disk, disk.span)

    def detach(self, device, name):
        return A.Detach(device.value, self._name(name),
                        _new_tuple(_Span, (self.file, device.start_pos, name.end_pos)))

    def swap(self, image):
        n = self._name(image)
        return A.SwapImage(n, n.span)

    def cooldown(self, value):
        return A.Cooldown(value, value.span)

    def revert(self, when):
        return A.Revert(when, when.span)

    # -- chains
    def chain(self, name, *rest):
        return self._block(A.Chain, name, rest)

    def step(self, name, image, *rest):
        return A.Step(self._name(name), self._name(image), rest[:-1],
                      _new_tuple(_Span, (self.file, name.start_pos, rest[-1].end_pos)))

    def morph_step(self, name, vm, *rest):
        return A.MorphStep(self._name(name), self._name(vm), rest[:-1],
                           _new_tuple(_Span, (self.file, name.start_pos, rest[-1].end_pos)))

    def io(self, direction, *names):
        return A.Io(direction.value, tuple(self._name(n) for n in names),
                    _new_tuple(_Span, (self.file, direction.start_pos, names[-1].end_pos)))

    def edge(self, first, *rest):
        when = rest[-1]
        path = (first,) + tuple(t for t in rest[:-1] if t.type == "NAME")
        end = when.span.end if when is not None else path[-1].end_pos
        return A.Edge(tuple(self._name(n) for n in path), when, _new_tuple(_Span, (self.file, first.start_pos, end)))

    # -- templates and reservations
    def template(self, name, *rest):
        params = tuple(p for p in rest if isinstance(p, A.Param))
        items = tuple(i for i in rest[:-1] if i is not None and not isinstance(i, A.Param))
        return A.Template(self._name(name), params, items,
                          _new_tuple(_Span, (self.file, name.start_pos, rest[-1].end_pos)))

    def param(self, name, default):
        end = default.span.end if default is not None else name.end_pos
        return A.Param(self._name(name), default, _new_tuple(_Span, (self.file, name.start_pos, end)))

    def use(self, template, name, *rest):
        return A.Use(self._name(template), self._name(name), rest[:-1],
                     _new_tuple(_Span, (self.file, template.start_pos, rest[-1].end_pos)))

    def reserve(self, name, *rest):
        return self._block(A.Reserve, name, rest)

    # -- expressions
    def or_(self, left, right):
        return self._boolop("or", left, right)

    def and_(self, left, right):
        return self._boolop("and", left, right)

    def _boolop(self, op, left, right):
        # Flatten `a and b and c` so a long chain stays shallow (left recursion would nest it).
        if isinstance(left, A.BoolOp) and left.op == op:
            operands = left.operands + (right,)
        else:
            operands = (left, right)
        depth = max(left.depth if isinstance(left, A.BoolOp) and left.op == op else _depth(left), _depth(right))
        return self._limit(A.BoolOp(op, operands, _new_tuple(_Span, (self.file, left.span.start, right.span.end)),
                                    depth))

    def not_(self, keyword, operand):
        return self._limit(A.Not(operand, _new_tuple(_Span, (self.file, keyword.start_pos, operand.span.end)),
                                 _depth(operand)))

    def compare(self, left, op, right, window):
        w = self.quantity(window) if window is not None else None
        end = (w if w is not None else right).span.end
        return self._limit(A.Compare(left, op.value, right, w, _new_tuple(_Span, (self.file, left.span.start, end)),
                                     _depth(left, right)))

    def range(self, low, high):
        return self._limit(A.Range(low, high, _new_tuple(_Span, (self.file, low.span.start, high.span.end)),
                                   _depth(low, high)))

    def running(self, call, negated):
        return self._limit(A.AppRunning(call, negated is not None, call.span, _depth(call)))

    def group(self, lpar, inner, rpar):
        return self._limit(A.Group(inner, _new_tuple(_Span, (self.file, lpar.start_pos, rpar.end_pos)),
                                   _depth(inner)))

    def list_(self, lsqb, *rest):
        items = tuple(i for i in rest[:-1] if i is not None)
        return self._limit(A.ListExpr(items, _new_tuple(_Span, (self.file, lsqb.start_pos, rest[-1].end_pos)),
                                      _depth(*items)))

    def call(self, name, *args):
        args = tuple(a for a in args if a is not None)
        end = args[-1].span.end if args else name.end_pos
        return self._limit(A.Call(self._name(name), args, _new_tuple(_Span, (self.file, name.start_pos, end)),
                                  _depth(*args)))

    def quantity(self, tok):
        text = tok.value
        number = text.rstrip(_UNIT_CHARS)
        return A.Quantity(text, number, text[len(number):],
                          _new_tuple(_Span, (self.file, tok.start_pos, tok.end_pos)))

    def string(self, tok):
        text = tok.value
        return A.String(_unescape(text[1:-1]), text, _new_tuple(_Span, (self.file, tok.start_pos, tok.end_pos)))

    def ref(self, tok):
        return A.Ref(tok.value, _new_tuple(_Span, (self.file, tok.start_pos, tok.end_pos)))


def _reducers(rules, builder) -> dict:
    """The LALR parser's callbacks, one per grammar rule: what Lark's inline transformer does, without its
    per-reduction layers (child filter, argument wrapper, a tree for every `_rule` and repetition).

    Each rule's children are known in advance, so each callback is one small function compiled for it:
    anonymous tokens are dropped, `_rules` and repetitions are spliced into their parent, an absent
    `[optional]` is None, and a `?rule` left with one child passes it through; any other rule calls the
    builder's method named after the rule (or its alias).
    """
    by_origin: dict[str, list] = {}
    for r in rules:
        by_origin.setdefault(r.origin.name, []).append(r)

    def slots(rule) -> list:
        """(index, splice) for each child the builder sees, None for a placeholder."""
        empty = rule.options.empty_indices
        nones = [0] * (len(rule.expansion) + 1)
        if empty:  # False for each symbol of the expansion, True for each absent optional before it
            i = 0
            for absent in empty:
                if absent:
                    nones[i] += 1
                else:
                    i += 1
        out: list = []
        for i, sym in enumerate(rule.expansion):
            out += [None] * nones[i]
            if not (sym.is_term and sym.filter_out):
                out.append((i, not sym.is_term and sym.name.startswith("_") and not single(sym.name)))
        return out + [None] * nones[-1]

    singles: dict[str, bool] = {}

    def single(name: str) -> bool:
        """An inlined rule that always stands for exactly one child: it passes that child on as it is."""
        if name not in singles:
            singles[name] = False  # a rule that reaches itself is a repetition
            singles[name] = all(len(s) == 1 and s[0] is not None and not s[0][1]
                                for s in map(slots, by_origin[name]))
        return singles[name]

    def arg(slot) -> str:
        return "None" if slot is None else f"*c[{slot[0]}]" if slot[1] else f"c[{slot[0]}]"

    out = {}
    for rule in rules:
        name = rule.origin.name
        ss = slots(rule)
        args = ", ".join(map(arg, ss))
        env: dict = {}
        if name.startswith("_") and single(name):
            out[rule] = itemgetter(ss[0][0])
            continue
        if name.startswith("_"):
            if ss and ss[0] == (0, True) and rule.expansion[0].name == name:  # `__items: __items item`
                rest = ", ".join(map(arg, ss[1:]))  # grow the list in place, as Lark's child filter does
                src = f"def f(c):\n    l = c[0]\n    l += ({rest},)\n    return l" if rest else \
                    "def f(c):\n    return c[0]"
            else:
                src = f"def f(c):\n    return [{args}]"
        elif rule.options.expand1 and not rule.alias:
            if len(ss) == 1 and ss[0] is not None and not ss[0][1]:
                out[rule] = itemgetter(ss[0][0])
                continue
            env["m"] = getattr(builder, name)  # how many children is only known once they are spliced
            src = f"def f(c):\n    k = [{args}]\n    return k[0] if len(k) == 1 else m(*k)"
        else:
            env["m"] = getattr(builder, rule.alias or name)
            src = f"def f(c):\n    return m({args})"
        exec(compile(src, f"<rule {rule}>", "exec"), env)
        out[rule] = env["f"]
    return out


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", '"': '"'}


def _unescape(body: str) -> str:
    if "\\" not in body:
        return body
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), body)


class _Rule(Rule):
    """A grammar rule compared by identity. Every reduction looks its rule up in the callback table and
    compares it with the end state; Lark's rules compare by value in Python, which costs about a tenth of
    the parse. Each rule object is unique once the grammar is loaded, so identity is the same test."""

    __slots__ = ()
    __hash__ = object.__hash__
    __eq__ = object.__eq__
    __ne__ = object.__ne__


class _Parser:
    """One Lark instance and the AST builder its reductions call; comments are gathered by a lexer callback."""

    def __init__(self, strict: bool = False) -> None:
        self.transformer = _ToAst()
        self.comments: list = []
        # strict=True checks every pair of terminals for collisions, which takes longer than a whole
        # validate of a small program; tests/test_parser.py loads the grammar strictly, so the check
        # still guards every change to the grammar without slowing every command.
        self.options = dict(
            parser="lalr",
            lexer="contextual",
            strict=strict,
            maybe_placeholders=True,
            lexer_callbacks={"COMMENT": self.comments.append},
            # The grammar analysis is kept in Lark's cache file (keyed on the grammar and these options), so
            # a new process builds the parser in a fraction of the time.
            cache=True,
        )
        try:  # lark-cython: same grammar and callbacks, the LALR loop in C
            import lark_cython

            self.fast = self._open(_plugins=lark_cython.plugins)
        except ImportError:  # pragma: no cover - the plain-Python parser is the fallback
            self.fast = None
        self._plain: Lark | None = None

    def _open(self, **extra) -> Lark:
        lark = Lark.open(grammar.PATH, **self.options, **extra)
        # The parser calls the callbacks from this table (Lark's own would build a tree): ours build the AST.
        callbacks = lark._callbacks
        callbacks.clear()
        for rule in lark.rules:
            rule.__class__ = _Rule
        callbacks.update(_reducers(lark.rules, self.transformer))
        return lark

    @property
    def plain(self) -> Lark:
        """The pure-Python parser: the fallback, and the one whose errors say what it expected."""
        if self._plain is None:
            self._plain = self._open()
            self.terminals = {t.name: t for t in self._plain.terminals}
        return self._plain

    def parse(self, path: str, text: str) -> tuple[A.FileAst | None, list[Diagnostic]]:
        t = self.transformer
        t.file = path
        t.too_deep = []
        self.comments.clear()
        try:
            items = (self.fast or self.plain).parse(text)
        except UnexpectedInput as first_error:
            found = first_error
            if self.fast is not None:
                # lark-cython's errors cannot list the acceptable tokens: ask the plain parser again.
                try:
                    self.plain.parse(text)
                except UnexpectedInput as plain_error:
                    found = plain_error
            return None, [self._syntax_error(path, text, found)]
        except RecursionError:  # defensive: nothing in the parse recurses, but never show a traceback
            return None, [error("F105", "expression nested too deeply", A.Span(path, 0, 0))]
        if t.too_deep:
            s = t.too_deep[0]
            return None, [error("F105", f"expression nested more than {MAX_DEPTH} levels deep", s,
                                label="too deep", help="split the condition into simpler rules")]
        comments = tuple(A.Comment(c.value, A.Span(path, c.start_pos, c.start_pos + len(c.value)))
                         for c in self.comments)
        return A.FileAst(path, tuple(items), comments), []

    # -- syntax errors in words
    def _describe(self, name: str) -> str:
        self.plain  # noqa: B018 - loads the terminal table
        if name in _TERMINAL_WORDS:
            return _TERMINAL_WORDS[name]
        term = self.terminals.get(name)
        if term is not None and term.pattern.type == "str":
            return f"`{term.pattern.value}`"
        return name.lower()

    def _expected(self, names) -> tuple[str, list[str]]:
        words = sorted({self._describe(n) for n in names})
        literals = [self.terminals[n].pattern.value for n in names
                    if n in self.terminals and self.terminals[n].pattern.type == "str"]
        if len(words) > 8:
            text = ", ".join(words[:8]) + f" or {len(words) - 8} more"
        elif len(words) > 1:
            text = ", ".join(words[:-1]) + " or " + words[-1]
        else:
            text = words[0] if words else "nothing"
        return text, literals

    def _syntax_error(self, path: str, text: str, e: UnexpectedInput) -> Diagnostic:
        if isinstance(e, UnexpectedEOF) or (isinstance(e, UnexpectedToken) and e.token.type == "$END"):
            names = (e.accepts or e.expected) if isinstance(e, UnexpectedToken) else e.expected
            expected, _ = self._expected(names or ())
            end = len(text)
            return error("F107", "unexpected end of file", A.Span(path, end, end),
                         label=f"expected {expected}", help="a block may be missing its closing `}`")
        if isinstance(e, UnexpectedToken):
            tok = e.token
            expected, literals = self._expected(e.accepts or e.expected)
            kind = {"NAME": "name ", "QUANTITY": "number ", "STRING": "string "}.get(tok.type, "")
            found = f"{kind}`{tok.value}`"
            hint = did_you_mean(tok.value, literals) if tok.type == "NAME" else None
            before = text[: tok.start_pos].rstrip()
            previous = re.findall(r"[A-Za-z_][A-Za-z0-9_]*$", before)
            spaced = _SPACED_UNIT.search(before) or (
                _SPACED_UNIT.search(before + " " + tok.value) if tok.type == "NAME" else None)
            if spaced:
                hint = f"write the unit right after the number, without a space: `{spaced[1]}{spaced[2]}`"
            elif tok.type == "NAME" and previous and previous[0] in _TOP_KEYWORDS and "`=`" in expected:
                hint = f"is the `}}` that closes the block before this `{previous[0]}` missing?"
            elif hint is None and tok.type == "NAME" and "`=`" in expected and "`(`" not in expected:
                hint = "an attribute is written `name = value`"
            return error("F101", f"unexpected {found}, expected {expected}",
                         A.Span(path, tok.start_pos, tok.end_pos), label=f"expected {expected}", help=hint)
        assert isinstance(e, UnexpectedCharacters)
        ch = text[e.pos_in_stream] if e.pos_in_stream < len(text) else ""
        span = A.Span(path, e.pos_in_stream, e.pos_in_stream + 1)
        if ch == '"':
            return error("F102", "unterminated string", span, label="string starts here",
                         help="strings end with `\"` on the same line")
        shown = ch if ch.isprintable() else repr(ch)
        helps = {";": "statements end at the end of the line: remove the `;`",
                 "/": "comments start with `#` or `//`",
                 ":": "attributes are written `name = value`"}
        return error("F102", f"unexpected character `{shown}`", span, label="not part of the language here",
                     help=helps.get(ch))


@lru_cache(maxsize=1)
def _parser() -> _Parser:
    return _Parser()


def decode(path: str, data: bytes) -> tuple[str | None, list[Diagnostic]]:
    """Bytes -> text, refusing what is not UTF-8 (F104) or too large (F106) with a located diagnostic."""
    if len(data) > MAX_FILE_BYTES:
        return None, [error("F106", f"file is {len(data):,} bytes, more than the {MAX_FILE_BYTES:,} allowed",
                            A.Span(path, 0, 0), help="split the program into several files")]
    try:
        return data.decode("utf-8"), []
    except UnicodeDecodeError as e:
        prefix = data[: e.start].decode("utf-8", errors="replace")
        at = len(prefix)
        return None, [error("F104", f"file is not valid UTF-8 (byte 0x{data[e.start]:02x})",
                            A.Span(path, at, at + 1), label="invalid byte",
                            help="save the file as UTF-8")]


def parse(path: str, text: str) -> tuple[A.FileAst | None, list[Diagnostic]]:
    """Parse one file. Returns the AST (None on a syntax error) and the diagnostics."""
    if text.startswith("\ufeff"):  # a BOM is harmless; offsets stay aligned because it is replaced by a space
        text = " " + text[1:]
    return _parser().parse(path, text)


def top_keywords() -> tuple[str, ...]:
    return _TOP_KEYWORDS
