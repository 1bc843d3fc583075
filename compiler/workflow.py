"""JSON workflow definitions -> `.flow` text: the importer of chains written in the JSON workflow format.

The JSON format (DESIGN.md, "The JSON workflow format") names a workflow, its steps (`image_id`, `name`,
`input_data`, `output_data`, `next_step`) and the image the workflow starts from. `import_workflow` turns one
such file into the text of one `chain` block, which then goes through the ordinary pipeline (parse, resolve,
build) like any hand-written `.flow` file; nothing downstream knows that it came from JSON.

The mapping: the chain is named `snake_case(workflow_name)`; each step (the start step first, since a
.flow chain starts at its first step, then the others in JSON order) becomes
`step snake_case(name) = image_id { in ... out ... }`; edges follow `next_step` from the step whose `image_id`
is `start_image`, one `a -> b -> c` line per maximal path (a linear workflow is one line). `next_step` names a
step however it is spelt (`image_resize`, `ImageResize`, `image-resize`); `"end"`, null or no `next_step` ends a
path, and a list of names branches. Step names that would not be valid (or would read as a keyword) in `.flow`
get a `step_` prefix.

Every diagnostic points into the JSON file, so this module carries its own position-aware JSON reader:
Python's `json` module says where a document is malformed but not where a well-formed value sits. Spans are
character offsets into `data.decode("utf-8")` (a leading byte-order mark counts as one character), the same
text a `compiler.source.Source` for the file holds.

Diagnostic codes (F5xx, workflow import):
  F501  the file is not UTF-8, not valid JSON, nested too deeply, or too large
  F502  a `next_step` names no step
  F503  a required field is missing or has the wrong type, or a value cannot be written in `.flow`
  F504  `start_image` is missing or is the image of no step
  F505  two steps whose names become the same `.flow` step name
  F506  (warning) a step that no path from the start step reaches
"""

from __future__ import annotations

import re
import unicodedata
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Union

import grammar
from compiler.ast import Span
from compiler.diagnostics import Diagnostic, Label, Severity, did_you_mean, error, sort, warning

# ============================================================================================ JSON reader

# Real nesting in a workflow is four levels; the limit keeps the recursive reader far from Python's own
# recursion limit whatever the caller's stack depth.
MAX_DEPTH = 200

# A hostile file can hold a million wrong values; past this many diagnostics the rest are counted, not listed.
MAX_DIAGNOSTICS = 100

# Suggestions cost a string comparison per candidate: past this many steps (a generated or hostile file) none
# are offered rather than spending seconds on each unknown name.
MAX_SUGGESTION_CANDIDATES = 1000

# A workflow definition is a page of JSON; past this the file is refused before it is read.
MAX_FILE_BYTES = 16 * 1024 * 1024


class JsonError(Exception):
    """Malformed JSON at [start, end) of the text."""

    def __init__(self, message: str, start: int, end: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.start = start
        self.end = start + 1 if end is None else end


class JObject:
    """A JSON object. Member spans live in one flat array (four offsets a member: key start and end, value
    start and end) rather than in an object per member, so that a huge document stays affordable."""

    __slots__ = ("_index", "_values", "_bounds")

    def __init__(self) -> None:
        self._index: dict[str, int] = {}
        self._values: list = []
        self._bounds = array("q")

    def _add(self, key: str, key_start: int, key_end: int, value, start: int, end: int) -> None:
        # A repeated key keeps its first place in the order and takes the last value, as json.loads does.
        self._index[key] = len(self._values)
        self._values.append(value)
        self._bounds.extend((key_start, key_end, start, end))

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def keys(self) -> Iterator[str]:
        return iter(self._index)

    def get(self, key: str) -> Json | None:
        i = self._index.get(key)
        if i is None:
            return None
        b = self._bounds
        return Json(self._values[i], b[4 * i + 2], b[4 * i + 3])

    def key_span(self, key: str) -> tuple[int, int]:
        """[start, end) of the key's string, quotes included. The key must be present."""
        i = self._index[key]
        return self._bounds[4 * i], self._bounds[4 * i + 1]


class JArray:
    """A JSON array; item spans live in one flat array (two offsets an item), as in `JObject`."""

    __slots__ = ("_values", "_bounds")

    def __init__(self) -> None:
        self._values: list = []
        self._bounds = array("q")

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[Json]:
        b = self._bounds
        for i, v in enumerate(self._values):
            yield Json(v, b[2 * i], b[2 * i + 1])


JsonValue = Union[JObject, JArray, str, int, float, bool, None]


@dataclass(frozen=True, slots=True)
class Json:
    """A JSON value and where it sits: [start, end) character offsets into the text it was read from."""

    value: JsonValue
    start: int
    end: int


def to_python(value: JsonValue):
    """The plain Python value, as `json.loads` would build it."""
    if isinstance(value, JObject):
        return {k: to_python(value._values[i]) for k, i in value._index.items()}
    if isinstance(value, JArray):
        return [to_python(v) for v in value._values]
    return value


_WS = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_PLAIN = re.compile(r'[^"\\\x00-\x1f]*')
_HEX4 = re.compile(r"[0-9a-fA-F]{4}")
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_WORDS = (("true", True), ("false", False), ("null", None))
_NUMBER_START = frozenset("-0123456789")
_BLANK = frozenset(" \t\n\r")  # JSON whitespace; the empty string (end of text) is not in it


def _describe(text: str, pos: int) -> str:
    if pos >= len(text):
        return "end of file"
    ch = text[pos]
    return f"`{ch}`" if ch.isprintable() and not ch.isspace() else repr(ch)


class _Reader:
    """Strict JSON (RFC 8259) by recursive descent; NaN and Infinity are refused, unlike json.loads."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.n = len(text)

    def document(self) -> Json:
        text = self.text
        pos = _WS.match(text, 1 if text.startswith("\ufeff") else 0).end()
        value, end = self.value(pos, 0)
        after = _WS.match(text, end).end()
        if after != self.n:
            raise JsonError(f"unexpected {_describe(text, after)} after the JSON value", after)
        return Json(value, pos, end)

    def value(self, pos: int, depth: int):
        text = self.text
        ch = text[pos : pos + 1]
        if ch == '"':
            return self.string(pos)
        if ch in _NUMBER_START:
            return self.number(pos)
        if ch == "{":
            return self.object(pos, depth + 1)
        if ch == "[":
            return self.array(pos, depth + 1)
        for word, v in _WORDS:
            if text.startswith(word, pos):
                return v, pos + len(word)
        raise JsonError(f"expected a value, found {_describe(text, pos)}", pos)

    def number(self, pos: int):
        m = _NUMBER.match(self.text, pos)
        if m is None:
            raise JsonError(f"expected a value, found {_describe(self.text, pos)}", pos)
        s = m.group()
        if m.lastindex:  # a fraction or an exponent
            return float(s), m.end()
        try:
            return int(s), m.end()
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            raise JsonError(f"number has {len(s):,} digits, too many to read", pos, m.end()) from None

    def string(self, pos: int):
        text = self.text
        chunks: list[str] = []
        begin = pos + 1
        while True:
            end = _PLAIN.match(text, begin).end()
            if end >= self.n:
                raise JsonError("unterminated string", pos)
            ch = text[end]
            if ch == '"':
                if not chunks:
                    return text[begin:end], end + 1
                chunks.append(text[begin:end])
                return "".join(chunks), end + 1
            chunks.append(text[begin:end])
            if ch != "\\":
                raise JsonError(f"control character {ch!r} in a string (write it as an escape)", end)
            esc = text[end + 1 : end + 2]
            if not esc:
                raise JsonError("unterminated string", pos)
            if esc == "u":
                if not _HEX4.match(text, end + 2):
                    raise JsonError("`\\u` must be followed by four hex digits", end + 1, min(end + 6, self.n))
                code = int(text[end + 2 : end + 6], 16)
                begin = end + 6
                # A surrogate pair written as two escapes is one character; a lone surrogate is kept as it
                # is, as json.loads keeps it.
                if 0xD800 <= code <= 0xDBFF and text.startswith("\\u", begin) and _HEX4.match(text, begin + 2):
                    low = int(text[begin + 2 : begin + 6], 16)
                    if 0xDC00 <= low <= 0xDFFF:
                        code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                        begin += 6
                chunks.append(chr(code))
            elif esc in _ESCAPES:
                chunks.append(_ESCAPES[esc])
                begin = end + 2
            else:
                raise JsonError(f"invalid escape `\\{esc}`" if esc.isprintable() else "invalid escape", end,
                                end + 2)

    def _enter(self, pos: int, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise JsonError(f"nested more than {MAX_DEPTH} levels deep", pos)

    def array(self, start: int, depth: int):
        self._enter(start, depth)
        text, ws, value = self.text, _WS.match, self.value
        arr = JArray()
        append, extend = arr._values.append, arr._bounds.extend
        pos = ws(text, start + 1).end()
        if text.startswith("]", pos):
            return arr, pos + 1
        # The hot loop of a large document: whitespace is skipped by regex only where there is some.
        while True:
            item, end = value(pos, depth)
            append(item)
            extend((pos, end))
            ch = text[end : end + 1]
            if ch in _BLANK:
                end = ws(text, end).end()
                ch = text[end : end + 1]
            if ch == ",":
                pos = end + 1
                if text[pos : pos + 1] in _BLANK:
                    pos = ws(text, pos).end()
            elif ch == "]":
                return arr, end + 1
            else:
                raise JsonError(f"expected `,` or `]`, found {_describe(text, end)}", end)

    def object(self, start: int, depth: int):
        self._enter(start, depth)
        text, ws = self.text, _WS.match
        obj = JObject()
        pos = ws(text, start + 1).end()
        if text.startswith("}", pos):
            return obj, pos + 1
        while True:
            if not text.startswith('"', pos):
                raise JsonError(f"expected a key in double quotes, found {_describe(text, pos)}", pos)
            key, key_end = self.string(pos)
            colon = ws(text, key_end).end()
            if not text.startswith(":", colon):
                raise JsonError(f"expected `:`, found {_describe(text, colon)}", colon)
            vpos = ws(text, colon + 1).end()
            value, vend = self.value(vpos, depth)
            obj._add(key, pos, key_end, value, vpos, vend)
            pos = ws(text, vend).end()
            ch = text[pos : pos + 1]
            if ch == ",":
                pos = ws(text, pos + 1).end()
            elif ch == "}":
                return obj, pos + 1
            else:
                raise JsonError(f"expected `,` or `}}`, found {_describe(text, pos)}", pos)


def read_json(text: str) -> Json:
    """Read one JSON document with the span of every value; raises `JsonError` where it is malformed."""
    try:
        return _Reader(text).document()
    except RecursionError:  # only when the caller's own stack is already nearly exhausted
        raise JsonError("nested too deeply", 0) from None


# ============================================================================================ names

# Words the .flow lexer may take for keywords where a step name stands (at the start of an edge line, for
# one); read from the grammar so that a new keyword is covered without touching this module.
with open(grammar.PATH, encoding="utf-8") as _f:
    KEYWORDS = frozenset(re.findall(r'"([a-z]+)"', re.sub(r"//[^\n]*", "", _f.read())))

_FLOW_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:[.\-][A-Za-z0-9_]+)*")


def _ascii(s: str) -> str:
    # "Größe" -> "Grosse": accents are dropped and ß spelt out, rather than each letter becoming a word
    # break; what has no ASCII spelling at all is dropped.
    return "".join(c if c.isascii() else c.casefold() if c.casefold().isascii() else ""
                   for c in unicodedata.normalize("NFKD", s))


def snake_case(name: str) -> str:
    """`ImageProcessingPipeline` -> `image_processing_pipeline`, `HTTPServer2` -> `http_server2`,
    `image resize` -> `image_resize`. The result holds only `[a-z0-9_]` and may be empty."""
    s = _ascii(name)
    s = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", s)
    s = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", s)
    return re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_").lower()


def _normalized(name: str) -> str:
    """The form two spellings of one step name share: `ImageResize`, `image_resize`, `image-resize`."""
    return re.sub(r"[^a-z0-9]", "", _ascii(name).lower())


def step_name(name: str, position: int) -> str:
    """The .flow name of a step: snake_case, made a valid NAME that no keyword can shadow."""
    s = snake_case(name)
    if not s:
        return f"step_{position}"
    if s[0].isdigit() or s in KEYWORDS:
        return "step_" + s
    return s


def chain_name(name: str) -> str:
    s = snake_case(name)
    if not s:
        return "imported_workflow"
    return "chain_" + s if s[0].isdigit() else s


# ============================================================================================ import


@dataclass(eq=False)  # identity: steps link to each other, and two steps may hold equal fields
class _Step:
    position: int  # 1-based place in `steps`
    name: str
    name_node: Json
    flow_name: str
    image_id: str
    inputs: list[str]
    outputs: list[str]
    next_steps: list[Json]  # the string values of `next_step`
    successors: dict[_Step, None] = field(default_factory=dict)  # an ordered set


_KIND = {str: "a string", bool: "a boolean", int: "a number", float: "a number", type(None): "null",
         JObject: "an object", JArray: "a list"}


def _kind(value: JsonValue) -> str:
    return _KIND.get(type(value), "a value")


def _shown(s: str) -> str:
    return s if s.isprintable() else repr(s)[1:-1]


def _file_name(path: str) -> str:
    name = re.split(r"[\\/]", path)[-1] or path
    # The name goes into a `#` comment: a newline in it would end the comment and start code.
    return "".join(c if c.isprintable() else "?" for c in name)


_NAME_RULE = "letters, digits and `_` (with `.` or `-` between words), not starting with a digit"


class _Importer:
    """One import: walks the JSON tree, collects diagnostics, renders the chain when there are none."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.diags: list[Diagnostic] = []
        # Steps refused for a bad field still have a name and an image that others may mention: such a
        # mention is not reported a second time as unknown.
        self.refused = 0
        self.refused_names: set[str] = set()
        self.all_images: list[str] = []  # of every step object with a string `image_id`, refused or not
        self.images_unknown = False  # some step object has no readable `image_id`
        self.failed = False
        self.unshown = 0
        self.first_unshown: Diagnostic | None = None

    def report(self, diag: Diagnostic) -> None:
        self.failed = self.failed or diag.severity is Severity.ERROR
        if len(self.diags) < MAX_DIAGNOSTICS:
            self.diags.append(diag)
            return
        if self.first_unshown is None:
            self.first_unshown = diag
        self.unshown += 1

    def finish(self) -> list[Diagnostic]:
        diags = sort(self.diags)
        d = self.first_unshown
        if d is not None:
            diags.append(Diagnostic(d.severity, d.code, f"{self.unshown:,} more problems are not shown", d.span,
                                    label="the first of them", help="fix the ones above and import again"))
        return diags

    @property
    def full(self) -> bool:
        """True once further diagnostics are only counted: nothing more is worth computing for them."""
        return len(self.diags) >= MAX_DIAGNOSTICS

    def suggest(self, word: str, candidates) -> str | None:
        if self.full or len(candidates) > MAX_SUGGESTION_CANDIDATES:
            return None
        return did_you_mean(word, candidates)

    def span(self, node: Json) -> Span:
        return Span(self.path, node.start, node.end)

    def wrong_type(self, what: str, node: Json, expected: str) -> None:
        self.report(error("F503", f"{what} must be {expected}, found {_kind(node.value)}", self.span(node),
                          label=f"expected {expected}"))

    def missing(self, key: str, obj: Json, owner: str, example: str) -> None:
        self.report(error("F503", f"{owner} has no `{key}`", self.span(obj), label=f"`{key}` missing",
                          help=f"add `\"{key}\": {example}`"))

    def string_field(self, obj: Json, key: str, owner: str, example: str) -> Json | None:
        """The non-blank string under `key`, or None after a diagnostic."""
        node = obj.value.get(key)
        if node is None:
            self.missing(key, obj, owner, example)
        elif not isinstance(node.value, str):
            self.wrong_type(f"`{key}`", node, "a string")
        elif not node.value.strip():
            self.report(error("F503", f"`{key}` is empty", self.span(node), label="empty",
                              help=f"write e.g. `\"{key}\": {example}`"))
        else:
            return node
        return None

    def data_names(self, obj: Json, key: str) -> list[str] | None:
        """`input_data` / `output_data`: optional; a list of names that .flow can write as they are."""
        node = obj.value.get(key)
        if node is None or node.value is None:
            return []
        if not isinstance(node.value, JArray):
            self.wrong_type(f"`{key}`", node, "a list of strings")
            return None
        names: list[str] | None = []
        for item in node.value:
            if not isinstance(item.value, str):
                self.wrong_type(f"an item of `{key}`", item, "a string")
                names = None
            elif not _FLOW_NAME.fullmatch(item.value):
                self.report(error("F503", f"data name `{_shown(item.value)}` cannot be written in .flow",
                                  self.span(item), label="not a name",
                                  help=f"data names are {_NAME_RULE}"))
                names = None
            elif names is not None:
                names.append(item.value)
        return names

    def next_steps(self, obj: Json) -> list[Json] | None:
        """`next_step`: optional; a step name, `"end"`, null, or a list of step names (a branch)."""
        node = obj.value.get("next_step")
        if node is None or node.value is None:
            return []
        if isinstance(node.value, str):
            return [node]
        if not isinstance(node.value, JArray):
            self.wrong_type("`next_step`", node, "a step name, a list of step names or null")
            return None
        items = list(node.value)
        for item in items:
            if not isinstance(item.value, str):
                self.wrong_type("an item of `next_step`", item, "a step name")
        return items if all(isinstance(i.value, str) for i in items) else None

    def step(self, item: Json, position: int) -> _Step | None:
        if not isinstance(item.value, JObject):
            self.wrong_type(f"step {position}", item, "an object")
            self.refused += 1
            self.images_unknown = True
            return None
        owner = f"step {position}"
        name = self.string_field(item, "name", owner, '"ImageUpload"')
        image = self.string_field(item, "image_id", owner, '"image_id_123"')
        if image is None:
            self.images_unknown = True
        else:
            self.all_images.append(image.value)
            # `step x = morph ...` is a morph step in .flow, so that one word cannot be an image id there.
            if not _FLOW_NAME.fullmatch(image.value) or image.value == "morph":
                self.report(error("F503", f"image id `{_shown(image.value)}` cannot be written in .flow",
                                  self.span(image), label="not an image name",
                                  help=f"image ids are {_NAME_RULE}, and not `morph`"))
                image = None
        inputs = self.data_names(item, "input_data")
        outputs = self.data_names(item, "output_data")
        nexts = self.next_steps(item)
        if name is None or image is None or inputs is None or outputs is None or nexts is None:
            self.refused += 1
            if name is not None:
                self.refused_names.update((_normalized(name.value), step_name(name.value, position)))
            return None
        return _Step(position, name.value, name, step_name(name.value, position), image.value, inputs, outputs,
                     nexts)

    # -- the workflow
    def run(self, root: Json) -> str | None:
        if not isinstance(root.value, JObject):
            self.report(error("F503", f"a workflow must be a JSON object, found {_kind(root.value)}",
                              self.span(root), label="expected an object",
                              help='a workflow reads `{"workflow_name": ..., "start_image": ..., '
                                   '"steps": [...]}`'))
            return None
        wf_name = self.string_field(root, "workflow_name", "the workflow", '"ImageProcessingPipeline"')
        steps: list[_Step] = []
        steps_node = root.value.get("steps")
        if steps_node is None:
            self.missing("steps", root, "the workflow", "[...]")
        elif not isinstance(steps_node.value, JArray):
            self.wrong_type("`steps`", steps_node, "a list of steps")
        else:
            for position, item in enumerate(steps_node.value, 1):
                s = self.step(item, position)
                if s is not None:
                    steps.append(s)
        have_list = steps_node is not None and isinstance(steps_node.value, JArray)

        by_flow_name = self.check_names(steps)
        start = self.start(root, steps, have_list)
        linked = self.link(steps, by_flow_name)
        # Reachability is only meaningful over the whole graph: a refused step or an unknown name hides edges.
        if start is not None and linked and have_list and not self.refused:
            self.check_reachable(steps, start)
        if self.failed or wf_name is None or start is None:
            return None
        return self.render(chain_name(wf_name.value), steps, start)

    def check_names(self, steps: list[_Step]) -> dict[str, _Step]:
        first: dict[str, _Step] = {}
        for s in steps:
            other = first.setdefault(s.flow_name, s)
            if other is s:
                continue
            self.report(error(
                "F505", f"two steps are named `{s.flow_name}`", self.span(s.name_node),
                label="second step with this name",
                labels=[Label(self.span(other.name_node), "first step with this name")],
                help=None if other.name == s.name else
                f"`{_shown(other.name)}` and `{_shown(s.name)}` both become `{s.flow_name}`; rename one of them"))
        return first

    def start(self, root: Json, steps: list[_Step], have_list: bool) -> _Step | None:
        node = root.value.get("start_image")
        if node is None:
            self.report(error("F504", "the workflow has no `start_image`", self.span(root),
                              label="`start_image` missing",
                              help='add `"start_image": "<image_id of the first step>"`'))
            return None
        if not isinstance(node.value, str):
            self.wrong_type("`start_image`", node, "a string")
            return None
        for s in steps:
            if s.image_id == node.value:
                return s
        # A refused step may be the one with this image, or one whose image could not be read: either was
        # reported already.
        if have_list and node.value not in self.all_images and not self.images_unknown:
            ids = list(dict.fromkeys(self.all_images))
            listed = ", ".join(f"`{_shown(i)}`" for i in ids[:5]) + (", ..." if len(ids) > 5 else "")
            hint = self.suggest(node.value, ids) or (f"the steps run {listed}" if ids else "the workflow has no steps")
            self.report(error("F504", f"no step runs the start image `{_shown(node.value)}`",
                              self.span(node), label="no step has this `image_id`", help=hint))
        return None

    def link(self, steps: list[_Step], by_flow_name: dict[str, _Step]) -> bool:
        """Resolve every `next_step`; False when some name resolved to no step."""
        keys: dict[str, _Step] = {}
        for s in steps:
            for key in (s.flow_name, _normalized(s.name), _normalized(s.flow_name)):
                keys.setdefault(key, s)
        linked = True
        for s in steps:
            for node in s.next_steps:
                key = _normalized(node.value)
                if key in ("", "end"):
                    continue
                target = keys.get(node.value) or keys.get(key)
                if target is None:
                    linked = False
                    if key not in self.refused_names and node.value not in self.refused_names:
                        self.report(error("F502", f"unknown next step `{_shown(node.value)}`",
                                          self.span(node), label="no step has this name",
                                          help=self.suggest(snake_case(node.value), by_flow_name)))
                else:
                    s.successors[target] = None
        return linked

    def check_reachable(self, steps: list[_Step], start: _Step) -> None:
        seen = {start}
        todo = [start]
        while todo:
            for t in todo.pop().successors:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        for s in steps:
            if s not in seen:
                self.report(warning(
                    "F506", f"step `{s.flow_name}` is not reached from the start step `{start.flow_name}`",
                    self.span(s.name_node), label="unreachable",
                    help="it is imported without edges; point a `next_step` at it, or remove it"))

    @staticmethod
    def paths(start: _Step) -> list[list[_Step]]:
        """Every edge reachable from the start, once, laid out as maximal paths.

        A path goes on through each step's first successor; the others start paths of their own, from the
        step that branches, once this one ends. A path ends at a step some path already went through (a join
        or a loop), so no edge is written twice and a loop cannot run forever. A linear workflow is one path.
        """
        lines: list[list[_Step]] = []
        visited = {start}
        queue: deque[tuple[_Step, _Step | None]] = deque([(start, None)])
        while queue:
            cur, nxt = queue.popleft()
            path = [cur]
            while True:
                if nxt is None:
                    if not cur.successors:
                        break
                    nxt, *others = cur.successors
                    queue.extend((cur, t) for t in others)
                path.append(nxt)
                if nxt in visited:
                    break
                visited.add(nxt)
                cur, nxt = nxt, None
            if len(path) > 1:
                lines.append(path)
        return lines

    def render(self, name: str, steps: list[_Step], start: _Step) -> str:
        out = [f"# imported from {_file_name(self.path)}", "", f"chain {name} {{"]
        # A .flow chain starts at its first step: the start step goes first, the others keep their order.
        for s in [start] + [s for s in steps if s is not start]:
            out.append(f"  step {s.flow_name} = {s.image_id} {{")
            if s.inputs:
                out.append("    in " + ", ".join(s.inputs))
            if s.outputs:
                out.append("    out " + ", ".join(s.outputs))
            out.append("  }")
        lines = self.paths(start)
        if lines:
            out.append("")
            out.extend("  " + " -> ".join(s.flow_name for s in line) for line in lines)
        out.append("}")
        return "\n".join(out) + "\n"


def decode(path: str, data: bytes) -> tuple[str | None, list[Diagnostic]]:
    """Bytes -> text for a JSON workflow, refusing what is too large or not UTF-8 (F501)."""
    if len(data) > MAX_FILE_BYTES:
        return None, [error("F501", f"file is {len(data):,} bytes, more than the {MAX_FILE_BYTES:,} allowed",
                            Span(path, 0, 0), help="a workflow definition is expected to be small")]
    try:
        return data.decode("utf-8"), []
    except UnicodeDecodeError as e:
        at = len(data[: e.start].decode("utf-8", errors="replace"))
        return None, [error("F501", f"file is not valid UTF-8 (byte 0x{data[e.start]:02x})", Span(path, at, at + 1),
                            label="invalid byte", help="save the file as UTF-8")]


def import_workflow(path: str, data: bytes) -> tuple[str | None, list[Diagnostic]]:
    """One JSON workflow -> the `.flow` text of one chain, and every diagnostic, each pointing into the JSON.

    The text is None when there are errors; warnings (F506) come with the text.
    """
    text, diags = decode(path, data)
    if text is None:
        return None, diags
    try:
        root = read_json(text)
    except JsonError as e:
        end = min(e.end, len(text))
        start = min(e.start, end)
        return None, [error("F501", f"invalid JSON: {e.message}", Span(path, start, end), label="here")]
    imp = _Importer(path)
    flow = imp.run(root)
    return flow, imp.finish()
