"""Source text -> `FileAst`: the only module that sees Lark.

The grammar (grammar/flow.lark) is loaded once per process with the LALR parser and an inline
transformer, so no parse tree is ever built: each rule reduces straight into its AST node. lark-cython
replaces the LALR loop when it is installed. Syntax errors become F1xx diagnostics that say, in words,
what was expected; the Lark tree and Lark's exceptions never leave this module.
"""

from __future__ import annotations

import re
from functools import lru_cache

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

import grammar
from compiler import ast as A
from compiler.diagnostics import Diagnostic, did_you_mean, error

# Conditions and values nest; deeper than this is refused with F105 rather than risking recursion in
# later stages (the LALR parser itself is iterative and would take any depth).
MAX_DEPTH = 64

# A program is text a person reviews; past this a file is refused before it is lexed (F106).
MAX_FILE_BYTES = 64 * 1024 * 1024

_QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]+)?)(.*)", re.S)

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


def _span(file: str, first, last) -> A.Span:
    return A.Span(file, _start(first), _end(last))


# Tokens come from Lark or from lark-cython (a different class, not a str): read them by attribute only.
def _start(x) -> int:
    span = getattr(x, "span", None)
    return x.start_pos if span is None else span.start


def _end(x) -> int:
    span = getattr(x, "span", None)
    return x.end_pos if span is None else span.end


def _depth(*children) -> int:
    return 1 + max((getattr(c, "depth", 0) for c in children if c is not None), default=0)


@v_args(inline=True)
class _ToAst(Transformer):
    """Builds AST nodes during the LALR reductions. `file` is set before each parse."""

    def __init__(self) -> None:
        super().__init__()
        self.file = ""
        self.too_deep: list[A.Span] = []

    # -- helpers
    def _name(self, tok: Token) -> A.Name:
        return A.Name(tok.value, A.Span(self.file, tok.start_pos, tok.end_pos))

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
        return A.Attr(self._name(name), value, _span(self.file, name, value))

    def pool(self, name, *rest):
        return A.Pool(self._name(name), rest[:-1], _span(self.file, name, rest[-1]))

    def vm(self, name, *rest):
        return A.Vm(self._name(name), rest[:-1], _span(self.file, name, rest[-1]))

    def disk(self, name, *rest):
        return A.Disk(self._name(name), rest[:-1], _span(self.file, name, rest[-1]))

    def nic(self, name, *rest):
        return A.Nic(self._name(name), rest[:-1], _span(self.file, name, rest[-1]))

    def morph(self, name, when, *rest):
        trailing = rest[-1]
        items = rest[:-2]
        if trailing is not None:
            items = items + (trailing,)
        last = trailing if trailing is not None else rest[-2]
        return A.Morph(self._name(name), when, items, _span(self.file, name, last))

    def adjust(self, target, op, value, limit_kind, limit):
        last = limit if limit is not None else value
        return A.Adjust(self._name(target), op.value, value, limit_kind.value if limit_kind else None, limit,
                        _span(self.file, target, last))

    def attach_disk(self, name, *rest):
        disk = A.Disk(self._name(name), rest[:-1], _span(self.file, name, rest[-1]))
        return A.AttachDisk(disk, disk.span)

    def detach(self, device, name):
        return A.Detach(device.value, self._name(name), _span(self.file, device, name))

    def swap(self, image):
        n = self._name(image)
        return A.SwapImage(n, n.span)

    def cooldown(self, value):
        return A.Cooldown(value, value.span)

    def revert(self, when):
        return A.Revert(when, when.span)

    # -- chains
    def chain(self, name, *rest):
        return A.Chain(self._name(name), rest[:-1], _span(self.file, name, rest[-1]))

    def step(self, name, image, *rest):
        return A.Step(self._name(name), self._name(image), rest[:-1], _span(self.file, name, rest[-1]))

    def morph_step(self, name, vm, *rest):
        return A.MorphStep(self._name(name), self._name(vm), rest[:-1], _span(self.file, name, rest[-1]))

    def io(self, direction, *names):
        return A.Io(direction.value, tuple(self._name(n) for n in names), _span(self.file, direction, names[-1]))

    def edge(self, first, *rest):
        when = rest[-1]
        path = (first,) + tuple(t for t in rest[:-1] if t.type == "NAME")
        last = when if when is not None else path[-1]
        return A.Edge(tuple(self._name(n) for n in path), when, _span(self.file, first, last))

    # -- templates and reservations
    def template(self, name, *rest):
        params = tuple(p for p in rest if isinstance(p, A.Param))
        items = tuple(i for i in rest[:-1] if i is not None and not isinstance(i, A.Param))
        return A.Template(self._name(name), params, items, _span(self.file, name, rest[-1]))

    def param(self, name, default):
        return A.Param(self._name(name), default, _span(self.file, name, default if default is not None else name))

    def use(self, template, name, *rest):
        return A.Use(self._name(template), self._name(name), rest[:-1], _span(self.file, template, rest[-1]))

    def reserve(self, name, *rest):
        return A.Reserve(self._name(name), rest[:-1], _span(self.file, name, rest[-1]))

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
        return self._limit(A.BoolOp(op, operands, A.Span(self.file, left.span.start, right.span.end), depth))

    def not_(self, keyword, operand):
        return self._limit(A.Not(operand, _span(self.file, keyword, operand), _depth(operand)))

    def compare(self, left, op, right, window):
        w = self.quantity(window) if window is not None else None
        last = w if w is not None else right
        return self._limit(A.Compare(left, op.value, right, w, _span(self.file, left, last), _depth(left, right)))

    def range(self, low, high):
        return self._limit(A.Range(low, high, _span(self.file, low, high), _depth(low, high)))

    def running(self, call, negated):
        return self._limit(A.AppRunning(call, negated is not None, call.span, _depth(call)))

    def group(self, lpar, inner, rpar):
        return self._limit(A.Group(inner, _span(self.file, lpar, rpar), _depth(inner)))

    def list_(self, lsqb, *rest):
        items = tuple(i for i in rest[:-1] if i is not None)
        return self._limit(A.ListExpr(items, _span(self.file, lsqb, rest[-1]), _depth(*items)))

    def call(self, name, *args):
        args = tuple(a for a in args if a is not None)
        last = args[-1] if args else name
        return self._limit(A.Call(self._name(name), args, _span(self.file, name, last), _depth(*args)))

    def quantity(self, tok):
        text = tok.value
        number, unit = _QUANTITY.match(text).groups()
        return A.Quantity(text, number, unit, A.Span(self.file, tok.start_pos, tok.end_pos))

    def string(self, tok):
        text = tok.value
        return A.String(_unescape(text[1:-1]), text, A.Span(self.file, tok.start_pos, tok.end_pos))

    def ref(self, tok):
        return A.Ref(tok.value, A.Span(self.file, tok.start_pos, tok.end_pos))


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", '"': '"'}


def _unescape(body: str) -> str:
    if "\\" not in body:
        return body
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), body)


class _Parser:
    """One Lark instance and its transformer; comments are gathered by a lexer callback."""

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
            transformer=self.transformer,
            lexer_callbacks={"COMMENT": self.comments.append},
            # The grammar analysis is kept in Lark's cache file (keyed on the grammar and these options), so
            # a new process builds the parser in a fraction of the time.
            cache=True,
        )
        try:  # lark-cython: same grammar and callbacks, the LALR loop in C
            import lark_cython

            self.fast = Lark.open(grammar.PATH, _plugins=lark_cython.plugins, **self.options)
        except ImportError:  # pragma: no cover - the plain-Python parser is the fallback
            self.fast = None
        self._plain: Lark | None = None

    @property
    def plain(self) -> Lark:
        """The pure-Python parser: the fallback, and the one whose errors say what it expected."""
        if self._plain is None:
            self._plain = Lark.open(grammar.PATH, **self.options)
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
