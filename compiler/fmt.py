"""The canonical formatter: a parsed file printed back in the one layout `vmflow fmt` accepts.

Beside the pipeline rather than in it: it reads the `FileAst` from compiler/parser.py together with the
source text, and never resolves anything. The style is Terraform's `fmt`: two-space indentation, one
attribute, action, clause, edge or `in`/`out` a line, `=` aligned within a run of attribute lines, one blank
line between top-level items and at most one (where the author left one) inside blocks. A trailing
`} cooldown 10m` moves inside its morph as the last item.

The tree holds no comments or blank lines, so the printer walks the tree and the source tokens in step:
every output line records which source tokens it printed, and each comment is then placed by its
neighbouring tokens (own-line comments before the line that follows them, end-of-line comments after the
line they end). Spans are not enough for this: a block's starts at its name, after the keyword, and a
call's ends at its last argument, before the `)`.

Nesting is walked with an explicit stack, not recursion: templates may nest as deep as a file goes, while
expressions are capped by the parser (`MAX_DEPTH`) and are printed recursively.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Iterator

from compiler import ast as A
from compiler.diagnostics import Diagnostic
from compiler.parser import parse

INDENT = "  "

# The grammar's terminals (grammar/flow.lark), merged into one scanner. Keywords lex as names here; the
# walk compares token text with what the tree says was written, so the kind does not matter. Word-like
# terminals come first and punctuation longest-first, which splits every text the parser accepted the way
# the parser did.
_SCANNER = re.compile(
    r"(?P<ws>[ \t\f\r\n]+)"
    r"|(?P<comment>#[^\n]*|//[^\n]*)"
    r'|(?P<token>"(?:[^"\\\n]|\\.)*"'
    r"|[0-9]+(?:\.[0-9]+)?(?:[A-Za-z%]+(?:/s)?)?"
    r"|[A-Za-z_][A-Za-z0-9_]*(?:[.\-][A-Za-z0-9_]+)*"
    r"|->|\.\.|\+=|-=|>=|<=|==|!=|[<>={}()\[\],])"
)

_BLANK = " \t\f\r\n"


class _OutOfStep(ValueError):
    """The text does not hold the tokens the tree says it does (the tree came from another text)."""


def format_source(path: str, text: str) -> tuple[str | None, list[Diagnostic]]:
    """Parse and format one file: the canonical text, or None and the syntax diagnostics."""
    file, diags = parse(path, text)
    if file is None:
        return None, diags
    return format_ast(file, text), diags


def format_ast(file: A.FileAst, text: str) -> str:
    """Print `file` back in canonical form; `text` must be the source it was parsed from.

    Every comment is kept, in order. An empty file (or one holding only whitespace) formats to "";
    anything else ends with exactly one newline. Raises ValueError when `text` does not hold the tokens
    of `file`.
    """
    if text.startswith("\ufeff"):  # the parser reads a BOM as a space; offsets stay aligned
        text = " " + text[1:]
    tokens = _scan(text)
    printer = _Printer(tokens, file.comments)
    printer.walk(file.items)
    if printer.cursor.i != len(tokens):
        raise _OutOfStep("text holds more tokens than the syntax tree accounts for")
    return _Layout(text, tokens, printer.lines, file.comments).render()


# ------------------------------------------------------------------------------------------ tokens


@dataclass(frozen=True, slots=True)
class _Token:
    text: str
    start: int
    end: int


def _scan(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        m = _SCANNER.match(text, pos)
        if m is None:
            raise _OutOfStep(f"no token at offset {pos}")
        if m.lastgroup == "token":
            tokens.append(_Token(m.group(), m.start(), m.end()))
        pos = m.end()
    return tokens


class _Cursor:
    """The next source token; `take` checks it against what the tree says was written there."""

    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.i = 0

    def peek(self) -> str | None:
        return self.tokens[self.i].text if self.i < len(self.tokens) else None

    def take(self, expected: str) -> str:
        found = self.peek()
        if found != expected:
            raise _OutOfStep(f"expected `{expected}` in the source, found `{found}`")
        self.i += 1
        return expected


# ------------------------------------------------------------------------------------------ lines


@dataclass(slots=True)
class _Line:
    """One output line before comments and blank lines are placed.

    `first`..`last` are the indices of the source tokens it prints (first > last when it prints none,
    as the closing `}` of a morph whose cooldown trailed it). Attribute lines keep name and value apart so
    that a run of them can have its `=` aligned.
    """

    indent: int
    kind: str  # "open" (ends with `{`), "close" (`}`), "attr", or "item" (anything else on one line)
    text: str
    first: int
    last: int
    name: str = ""
    value: str = ""


# A block being printed: a generator that emits its header line, yields its children (each with its
# indentation) for the walk to print, and emits its closing line when resumed after the last one.
_Block = Iterator[tuple[object, int]]


class _Printer:
    def __init__(self, tokens: list[_Token], comments: tuple[A.Comment, ...]) -> None:
        self.cursor = _Cursor(tokens)
        self.tokens = tokens
        self.comment_starts = [c.span.start for c in comments]
        self.lines: list[_Line] = []

    def walk(self, items: tuple) -> None:
        stack: list[_Block] = [iter([(item, 0) for item in items])]
        while stack:
            child = next(stack[-1], None)
            if child is None:
                stack.pop()
                continue
            node, indent = child
            block = self._item(node, indent)
            if block is not None:
                stack.append(block)

    # -- emitting

    def _emit(self, indent: int, kind: str, text: str, first: int, **attr: str) -> None:
        self.lines.append(_Line(indent, kind, text, first, self.cursor.i - 1, **attr))

    def _comment_between(self, i: int, j: int) -> bool:
        """Whether a comment sits between source tokens i and j."""
        k = bisect_left(self.comment_starts, self.tokens[i].end)
        return k < len(self.comment_starts) and self.comment_starts[k] < self.tokens[j].start

    # -- block items

    def _item(self, node: object, indent: int) -> _Block | None:
        """Print a one-line item, or return the generator that prints a block."""
        c = self.cursor
        first = c.i
        if isinstance(node, A.Attr):
            name = c.take(node.name.value)
            c.take("=")
            value = self._expr(node.value)
            self._emit(indent, "attr", f"{name} = {value}", first, name=name, value=value)
        elif isinstance(node, A.Adjust):
            text = f"{c.take(node.target.value)} {c.take(node.op)} {self._expr(node.value)}"
            if node.limit_kind is not None:
                text += f" {c.take(node.limit_kind)} {self._expr(node.limit)}"
            self._emit(indent, "item", text, first)
        elif isinstance(node, A.Detach):
            c.take("detach")
            self._emit(indent, "item", f"detach {c.take(node.device)} {c.take(node.name.value)}", first)
        elif isinstance(node, A.SwapImage):
            c.take("swap")
            c.take("image")
            self._emit(indent, "item", f"swap image {c.take(node.image.value)}", first)
        elif isinstance(node, A.Cooldown):
            c.take("cooldown")
            self._emit(indent, "item", f"cooldown {self._expr(node.value)}", first)
        elif isinstance(node, A.Revert):
            c.take("revert")
            c.take("when")
            self._emit(indent, "item", f"revert when {self._expr(node.when)}", first)
        elif isinstance(node, A.Io):
            self._emit(indent, "item", f"{c.take(node.direction)} {self._names(node.names, ',', ', ')}", first)
        elif isinstance(node, A.Edge):
            text = self._names(node.path, "->", " -> ")
            if node.when is not None:
                c.take("when")
                text += f" when {self._expr(node.when)}"
            self._emit(indent, "item", text, first)
        elif isinstance(node, A.Import):
            c.take("import")
            self._emit(indent, "item", f"import {c.take(node.path.text)}", first)
        else:
            return self._block(node, indent)
        return None

    def _names(self, names: tuple[A.Name, ...], between: str, joiner: str) -> str:
        out = []
        for k, n in enumerate(names):
            if k:
                self.cursor.take(between)
            out.append(self.cursor.take(n.value))
        return joiner.join(out)

    def _block(self, node: object, indent: int) -> _Block:
        c = self.cursor
        first = c.i
        if isinstance(node, A.Pool):
            head, children = f"pool {self._keyword_name('pool', node.name)}", node.attrs
        elif isinstance(node, A.Vm):
            head, children = f"vm {self._keyword_name('vm', node.name)}", node.items
        elif isinstance(node, A.Disk):
            head, children = f"disk {self._keyword_name('disk', node.name)}", node.attrs
        elif isinstance(node, A.Nic):
            head, children = f"nic {self._keyword_name('nic', node.name)}", node.attrs
        elif isinstance(node, A.AttachDisk):
            c.take("attach")
            head, children = f"attach disk {self._keyword_name('disk', node.disk.name)}", node.disk.attrs
        elif isinstance(node, A.Morph):
            name = self._keyword_name("morph", node.name)
            c.take("when")
            head, children = f"morph {name} when {self._expr(node.when)}", node.items
        elif isinstance(node, A.Chain):
            head, children = f"chain {self._keyword_name('chain', node.name)}", node.items
        elif isinstance(node, A.Step):
            name = self._keyword_name("step", node.name)
            c.take("=")
            head, children = f"step {name} = {c.take(node.image.value)}", node.items
        elif isinstance(node, A.MorphStep):
            name = self._keyword_name("step", node.name)
            c.take("=")
            c.take("morph")
            head, children = f"step {name} = morph {c.take(node.vm.value)}", node.items
        elif isinstance(node, A.Template):
            name = self._keyword_name("template", node.name)
            head, children = f"template {name}{self._params(node)}", node.items
        elif isinstance(node, A.Use):
            template = self._keyword_name("use", node.template)
            c.take("as")
            head, children = f"use {template} as {c.take(node.name.value)}", node.attrs
        elif isinstance(node, A.Reserve):
            head, children = f"reserve {self._keyword_name('reserve', node.name)}", node.attrs
        else:
            raise TypeError(f"cannot format {type(node).__name__}")
        return self._body(head, children, indent, first, trailing=isinstance(node, A.Morph))

    def _keyword_name(self, keyword: str, name: A.Name) -> str:
        self.cursor.take(keyword)
        return self.cursor.take(name.value)

    def _params(self, node: A.Template) -> str:
        c = self.cursor
        c.take("(")
        out = []
        for k, p in enumerate(node.params):
            if k:
                c.take(",")
            text = c.take(p.name.value)
            if p.default is not None:
                c.take("=")
                text += f" = {self._expr(p.default)}"
            out.append(text)
        c.take(")")
        return f"({', '.join(out)})"

    def _body(self, head: str, children: tuple, indent: int, first: int, trailing: bool) -> _Block:
        c = self.cursor
        c.take("{")
        if not children and not self._comment_between(c.i - 1, c.i):
            c.take("}")
            self._emit(indent, "item", f"{head} {{}}", first)
            return
        self._emit(indent, "open", f"{head} {{", first)
        for child in children[:-1]:
            yield child, indent + 1
        last = children[-1] if children else None
        if trailing and isinstance(last, A.Cooldown) and c.peek() == "}":
            # `morph ... { ... } cooldown 10m`: the tree has the cooldown as the last item, the source has
            # the `}` before it. The cooldown's line prints that `}` token too, so that lines still print
            # tokens in source order, and the closing line prints none.
            start = c.i
            c.take("}")
            c.take("cooldown")
            self._emit(indent + 1, "item", f"cooldown {self._expr(last.value)}", start)
            self.lines.append(_Line(indent, "close", "}", c.i, c.i - 1))
            return
        if last is not None:
            yield last, indent + 1
        start = c.i
        c.take("}")
        self._emit(indent, "close", "}", start)

    # -- expressions (depth is capped by the parser, so recursion is bounded)

    def _expr(self, e: A.Expr) -> str:
        c = self.cursor
        if isinstance(e, A.Quantity):
            return c.take(e.text)
        if isinstance(e, A.String):
            return c.take(e.text)
        if isinstance(e, A.Ref):
            return c.take(e.name)
        if isinstance(e, A.Call):
            return self._call(e)
        if isinstance(e, A.Compare):
            text = f"{self._expr(e.left)} {c.take(e.op)} {self._expr(e.right)}"
            if e.window is not None:
                c.take("for")
                text += f" for {c.take(e.window.text)}"
            return text
        if isinstance(e, A.Range):
            low = self._expr(e.low)
            c.take("..")
            return f"{low} .. {self._expr(e.high)}"
        if isinstance(e, A.AppRunning):
            call = self._call(e.call)
            if e.negated:
                c.take("not")
            c.take("running")
            return f"{call} not running" if e.negated else f"{call} running"
        if isinstance(e, A.BoolOp):
            parts = []
            for k, operand in enumerate(e.operands):
                if k:
                    c.take(e.op)
                parts.append(self._expr(operand))
            return f" {e.op} ".join(parts)
        if isinstance(e, A.Not):
            c.take("not")
            return f"not {self._expr(e.operand)}"
        if isinstance(e, A.Group):
            c.take("(")
            inner = self._expr(e.inner)
            c.take(")")
            return f"({inner})"
        if isinstance(e, A.ListExpr):
            return f"[{self._sequence('[', e.items, ']')}]"
        raise TypeError(f"cannot format {type(e).__name__}")

    def _call(self, e: A.Call) -> str:
        name = self.cursor.take(e.name.value)
        return f"{name}({self._sequence('(', e.args, ')')})"

    def _sequence(self, open_: str, items: tuple, close: str) -> str:
        c = self.cursor
        c.take(open_)
        parts = []
        for k, item in enumerate(items):
            if k:
                c.take(",")
            parts.append(self._expr(item))
        c.take(close)
        return ", ".join(parts)



# ------------------------------------------------------------------------------------------ layout


@dataclass(slots=True)
class _Row:
    """One line of output: a printed line or a comment on its own, with a blank line before it or not."""

    indent: int
    kind: str  # a `_Line` kind, or "comment"
    text: str
    blank: bool
    starts_top_item: bool = False
    eol: str | None = None
    name: str = ""
    value: str = ""


@dataclass(slots=True)
class _Placed:
    """The comments that go with one line."""

    leading: list[A.Comment] = field(default_factory=list)  # own-line, just before the line's first token
    inner: list[A.Comment] = field(default_factory=list)  # between its tokens: moved to just before it
    eol: A.Comment | None = None  # on the same source line, right after its last token


class _Layout:
    """Places comments and blank lines around the printed lines, aligns `=`, and renders the text."""

    def __init__(self, text: str, tokens: list[_Token], lines: list[_Line],
                 comments: tuple[A.Comment, ...]) -> None:
        self.text = text
        self.tokens = tokens
        self.lines = lines
        self.placed = [_Placed() for _ in lines]
        self.tail: list[A.Comment] = []
        owner = [0] * len(tokens)
        for k, line in enumerate(lines):
            for i in range(line.first, line.last + 1):
                owner[i] = k
        starts = [t.start for t in tokens]
        for comment in comments:
            self._place(comment, bisect_left(starts, comment.span.start), owner)

    def _place(self, comment: A.Comment, after: int, owner: list[int]) -> None:
        """`after` is the index of the first token after the comment."""
        before = after - 1
        if before >= 0 and "\n" not in self.text[self.tokens[before].end:comment.span.start]:
            placed = self.placed[owner[before]]
            if self.lines[owner[before]].last == before:
                placed.eol = comment
            else:
                placed.inner.append(comment)
        elif after < len(self.tokens):
            placed = self.placed[owner[after]]
            if self.lines[owner[after]].first == after:
                placed.leading.append(comment)
            else:
                placed.inner.append(comment)
        else:
            self.tail.append(comment)

    def _blank_before(self, offset: int) -> bool:
        """Whether the source has an empty line just before `offset`."""
        newlines, i = 0, offset - 1
        while i >= 0 and self.text[i] in _BLANK:
            newlines += self.text[i] == "\n"
            if newlines >= 2:
                return True
            i -= 1
        return False

    def rows(self) -> list[_Row]:
        rows: list[_Row] = []
        for line, placed in zip(self.lines, self.placed):
            group: list[_Row] = []
            # Comments before a closing `}` belong to the block's body, one level in.
            lead_indent = line.indent + 1 if line.kind == "close" else line.indent
            for c in placed.leading:
                group.append(_Row(lead_indent, "comment", _strip(c.text), self._blank_before(c.span.start)))
            blank = line.first <= line.last and line.kind != "close" and self._blank_before(
                self.tokens[line.first].start)
            for c in placed.inner:
                group.append(_Row(line.indent, "comment", _strip(c.text), blank))
                blank = False
            group.append(_Row(line.indent, line.kind, line.text, blank, name=line.name, value=line.value,
                              eol=_strip(placed.eol.text) if placed.eol is not None else None))
            if line.indent == 0 and line.kind != "close":
                group[0].starts_top_item = True
            rows.extend(group)
        for c in self.tail:
            rows.append(_Row(0, "comment", _strip(c.text), self._blank_before(c.span.start)))
        # Blank lines: exactly one between top-level items; elsewhere one where the source had any, but
        # never at the start of the file, just inside a `{` or just before a `}`.
        for k, row in enumerate(rows):
            if k == 0 or rows[k - 1].kind == "open" or row.kind == "close":
                row.blank = False
            elif row.starts_top_item:
                row.blank = True
        _align(rows)
        return rows

    def render(self) -> str:
        out: list[str] = []
        for row in self.rows():
            if row.blank:
                out.append("")
            line = INDENT * row.indent + row.text
            if row.eol is not None:
                line += " " + row.eol
            out.append(line)
        return "\n".join(out) + "\n" if out else ""


def _align(rows: list[_Row]) -> None:
    """Align `=` across each run of attribute lines: consecutive, same block, no blank line between."""
    k = 0
    while k < len(rows):
        if rows[k].kind != "attr":
            k += 1
            continue
        end = k + 1
        while end < len(rows) and rows[end].kind == "attr" and not rows[end].blank \
                and rows[end].indent == rows[k].indent:
            end += 1
        width = max(len(r.name) for r in rows[k:end])
        for r in rows[k:end]:
            r.text = f"{r.name.ljust(width)} = {r.value}"
        k = end


def _strip(comment: str) -> str:
    # Comments run to the end of the line, so trailing whitespace (a `\r` from CRLF files among it) is part
    # of their text; the canonical form drops it.
    return comment.rstrip()
