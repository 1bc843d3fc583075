"""Image schemas: load `specs/images/<id>.yaml` (and any user image directories) into a `Catalog`.

A folder of schemas is a directory on disk or any `SchemaFolder` (a program's `images/` inside one git
revision, read without a checkout).

An image is what a VM boots from and what a chain step runs: where its disk comes from (a qcow2 file under
the image root, or a storage-pool volume), its OS, the cpu and memory range it supports, what it can change
while running (capabilities), which workflow roles it plays, and the typed data it consumes and produces.
The resolver and validator check every `image = ...`, `swap image ...`, `step x = ...` and every data name
against this catalog, so its errors have to be as precise as the `.flow` ones: every diagnostic points into
the YAML text (spans from `yaml.compose` marks, which are character offsets like every other span).

Schema, one image per file, the file named after the id:

    id: linux-base                  # required; a NAME, equal to the file stem
    description: Debian 12 base     # optional string
    os: debian-12                   # required string
    source: {path: linux-base.qcow2}        # required: exactly one of `path` (relative to the image
                                            # root) or `volume: {pool: ..., name: ...}`
    boot:                           # optional: direct kernel boot, paths relative to the image root
      kernel: boot/vmlinuz          # required within `boot`
      initrd: boot/initrd.gz        # optional
      cmdline: console=ttyS0 quiet  # optional string
    resources:                      # required
      cpu:    {min: 1, max: 16}     # whole vCPUs, 1 <= min <= max
      memory: {min: 512MiB, max: 16GiB}     # sizes with a byte unit, min <= max
    capabilities: [cpu_hotplug, guest_agent]   # optional, from CAPABILITIES
    roles: [general]                # optional, from ROLES
    inputs:  [{name: raw_records, type: records, format: application/x-ndjson}]   # optional
    outputs: [{name: clean_records, type: records}]                               # optional

Capabilities (what can change while the guest runs, so which morphs can be applied live):
    cpu_hotplug     vCPUs can be added and removed
    memory_balloon  memory can be resized within the maximum through the balloon driver
    memory_hotplug  memory can be grown past the boot maximum with DIMM hotplug
    disk_hotplug    disks can be attached and detached
    nic_hotplug     network interfaces can be attached and detached
    guest_agent     the QEMU guest agent answers (health checks, clean shutdown, fs freeze)

Roles (what a step running this image does in a chain; the workflow importer and `Catalog.with_role` read them):
    ingestion       brings data in from outside (uploads, extracts, sign-ups)
    transformation  reshapes data (resize, clean, convert)
    inference       runs a model over data
    storage         writes data somewhere durable
    notification    tells a person or system something happened
    validation      accepts or rejects data (checks, KYC)
    enrichment      adds information to data from another source
    general         a general-purpose machine, no particular role

Data types of inputs and outputs: DATA_TYPES. `format` is a free string (a MIME type or similar).

Codes: F401 the file is not a YAML mapping (does not parse, is not UTF-8, is empty, is too large or too
deep, uses aliases); F402 a field is missing, unknown, or has a wrong type or value; F403 an id already
defined by an earlier file; F404 the id differs from the file name; F405 an image directory or file cannot be
read; F310 an image source path is absolute or escapes the image root (shared with `disk { source = ... }`).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Mapping, Protocol, runtime_checkable

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from compiler.ast import Span
from compiler.diagnostics import Diagnostic, Label, did_you_mean, error, warning
from compiler.source import SourceSet
from compiler.units import MAX_VALUE, Dimension, format_bytes, known_units, parse_quantity

# The catalog that ships with vmflow; user directories are searched before it so they can override an id.
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "specs" / "images"

CAPABILITIES: frozenset[str] = frozenset(
    {"cpu_hotplug", "memory_balloon", "memory_hotplug", "disk_hotplug", "nic_hotplug", "guest_agent"}
)
ROLES: tuple[str, ...] = (
    "ingestion", "transformation", "inference", "storage", "notification", "validation", "enrichment", "general",
)
DATA_TYPES: tuple[str, ...] = ("string", "url", "json", "int", "float", "bool", "bytes", "records", "table")

# KVM on x86 tops out at 4096 vCPUs; a larger count could never start, and refusing it here keeps
# absurd numbers (10**400) out of every later stage.
MAX_VCPUS = 4096

# Bounds that make hostile files cheap to refuse. A real schema is well under 4 KiB, a dozen levels deep
# and a few hundred nodes; these limits are far above that and far below what hurts the YAML parser.
MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 64
MAX_NODES = 20_000

# Bumped when the meaning of a schema changes, so caches keyed on `Catalog.fingerprint` are invalidated.
_SCHEMA_VERSION = b"vmflow-images/2"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:[.\-][A-Za-z0-9_]+)*")
_VOLUME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+\-]*")
_DECIMAL = re.compile(r"[-+]?[0-9_]+")

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"

_TOP_FIELDS = ("id", "description", "os", "source", "boot", "resources", "capabilities", "roles", "inputs",
               "outputs")
_TOP_REQUIRED = ("id", "os", "source", "resources")


# ------------------------------------------------------------------------------------------ values


@dataclass(frozen=True, slots=True)
class Volume:
    """A disk that already lives in a libvirt storage pool."""

    pool: str
    name: str


@dataclass(frozen=True, slots=True)
class Boot:
    """Direct kernel boot: the kernel (and initrd) are files under the image root, not inside the disk."""

    kernel: str  # normalized, relative to the image root
    initrd: str | None
    cmdline: str


@dataclass(frozen=True, slots=True)
class DataPort:
    """One typed input or output of an image; `span` is the port's name in the YAML."""

    name: str
    type: str
    format: str | None
    span: Span


@dataclass(frozen=True, slots=True)
class Image:
    id: str
    description: str
    os: str
    source_path: str | None  # normalized, relative to the image root; exactly one of path and volume is set
    source_volume: Volume | None
    cpu_min: int
    cpu_max: int
    memory_min: int  # bytes
    memory_max: int  # bytes
    capabilities: frozenset[str]
    roles: tuple[str, ...]
    inputs: tuple[DataPort, ...]
    outputs: tuple[DataPort, ...]
    path: str  # the schema file, as registered in the SourceSet
    span: Span  # the id's value: where "image defined here" labels point
    source_span: Span | None  # the source path or volume value
    boot: Boot | None = None  # None: the disk boots itself (firmware and bootloader)

    def supports(self, capability: str) -> bool:
        return capability in self.capabilities


@dataclass(frozen=True, slots=True)
class Catalog:
    """Every valid image by id, plus a fingerprint of the files it was read from (a cache key)."""

    images: Mapping[str, Image]
    fingerprint: str
    # Ids whose schema exists but has errors: references to them are not reported as unknown again.
    broken: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        # A read-only view of a private copy: the catalog is shared by every stage of a compilation.
        object.__setattr__(self, "images", MappingProxyType(dict(self.images)))

    @classmethod
    def empty(cls) -> Catalog:
        return cls({}, hashlib.sha256(_SCHEMA_VERSION).hexdigest())

    def get(self, image_id: str) -> Image | None:
        return self.images.get(image_id)

    def ids(self) -> tuple[str, ...]:
        return tuple(sorted(self.images))

    def with_role(self, role: str) -> tuple[Image, ...]:
        return tuple(self.images[i] for i in sorted(self.images) if role in self.images[i].roles)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.images

    def __len__(self) -> int:
        return len(self.images)


# ------------------------------------------------------------------------------------------ source paths


def _show(text: str, limit: int = 60) -> str:
    """A value fit for a one-line message: control characters escaped, long values cut."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def check_source_path(path_text: str, span: Span | None) -> Diagnostic | None:
    """F310 unless `path_text` names a file inside the image root.

    Purely lexical: the root may not exist at compile time, and a check that followed symlinks would
    depend on the machine that compiles. The controller resolves the path again when it opens the file.
    """
    help_text = "image sources are relative to the image root, e.g. `debian-12.qcow2` or `base/debian-12.qcow2`"
    if path_text == "":
        return error("F310", "image source is empty", span, label="empty path", help=help_text)
    if "\0" in path_text:
        return error("F310", f"image source `{_show(path_text)}` contains a NUL byte", span,
                     label="NUL byte in path", help=help_text)
    if path_text.startswith("/"):
        return error("F310", f"image source `{_show(path_text)}` is an absolute path", span,
                     label="absolute path", help=help_text)
    normal = posixpath.normpath(path_text)
    if normal == ".." or normal.startswith("../"):
        return error("F310", f"image source `{_show(path_text)}` escapes the image root", span,
                     label="leaves the image root", help=help_text)
    if normal == ".":
        return error("F310", f"image source `{_show(path_text)}` names the image root itself, not a file", span,
                     label="not a file", help=help_text)
    return None


# ------------------------------------------------------------------------------------------ YAML reading


class _Refused(Exception):
    """A document the loader will not compose; carries the position to point at."""

    def __init__(self, message: str, index: int, help: str | None = None):
        super().__init__(message)
        self.message = message
        self.index = index
        self.help = help


class _Loader(yaml.SafeLoader):
    """SafeLoader's composer with limits, so a hostile file costs a diagnostic and nothing more.

    Aliases are refused outright: composing them is cheap (nodes are shared), but every walk over the tree
    afterwards would pay for the expansion (the "billion laughs"), and an image schema has no use for them.
    Depth is capped because the composer recurses per level and would hit the interpreter's limit.
    """

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent, index):  # noqa: ANN001 - signature of yaml.composer.Composer
        if self.check_event(AliasEvent):
            event = self.peek_event()
            raise _Refused(f"alias `*{_show(event.anchor)}` is not allowed in an image schema",
                           event.start_mark.index, help="write the value out in full")
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _Refused(f"image schema has more than {MAX_NODES} values", self.peek_event().start_mark.index)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"image schema is nested more than {MAX_DEPTH} levels deep",
                               self.peek_event().start_mark.index)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _compose(text: str) -> Node | None:
    loader = _Loader(text)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def _kind(node: Node) -> str:
    """What a node is, in words, for "should be X, not Y" messages."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    known = {_STR: "a string", _INT: "a whole number", _FLOAT: "a number", _BOOL: "a boolean", _NULL: "null"}
    if node.tag in known:
        return known[node.tag]
    tag = node.tag.replace("tag:yaml.org,2002:", "!!", 1)
    return f"a value tagged `{_show(tag)}`"


# ------------------------------------------------------------------------------------------ checking


class _FileCheck:
    """Validates one composed document; collects diagnostics and knows whether the image is usable."""

    def __init__(self, path: str, stem: str, text: str, diags: list[Diagnostic]):
        self.path = path
        self.stem = stem
        self.text = text
        self.diags = diags
        self.failed = False

    # -- spans and reporting

    def span(self, node: Node) -> Span:
        return Span(self.path, node.start_mark.index, node.end_mark.index)

    def first_line(self, node: Node) -> Span:
        start = node.start_mark.index
        end = self.text.find("\n", start)
        return Span(self.path, start, len(self.text) if end == -1 else end)

    def err(self, code: str, message: str, span: Span, **kw) -> None:
        self.failed = True
        self.diags.append(error(code, message, span, **kw))

    def wrong(self, where: str, node: Node, wanted: str, *, help: str | None = None) -> None:
        if node.tag == _NULL and isinstance(node, ScalarNode):
            self.err("F402", f"`{where}` has no value", self.span(node) if node.value else self._after_key(node),
                     label=f"expected {wanted}", help=help or "give a value or leave the field out")
        else:
            self.err("F402", f"`{where}` should be {wanted}, not {_kind(node)}", self.span(node),
                     label=f"expected {wanted}", help=help)

    def _after_key(self, node: Node) -> Span:
        # An empty value has a zero-width mark just after its key; point at the `key:` before it instead,
        # which is what the reader sees.
        end = node.start_mark.index
        line = self.text.rfind("\n", 0, end) + 1
        start = line + len(self.text[line:end]) - len(self.text[line:end].lstrip(" -\t"))
        return Span(self.path, start, max(start, len(self.text[:end].rstrip())))

    # -- shapes

    def fields(self, node: Node, where: str | None, known: Iterable[str], required: Iterable[str],
               anchor: Span) -> dict[str, tuple[ScalarNode, Node]] | None:
        """The fields of a mapping by name, after reporting unknown, repeated and missing ones.

        `anchor` is where a missing field is reported: the key that holds this mapping, or the first line.
        """
        if not isinstance(node, MappingNode):
            self.wrong(where or "image schema", node, "a mapping")
            return None
        known = tuple(known)
        out: dict[str, tuple[ScalarNode, Node]] = {}
        for key, value in node.value:
            if not (isinstance(key, ScalarNode) and key.tag == _STR):
                self.err("F402", f"field names should be plain words, not {_kind(key)}", self.span(key),
                         label="not a field name")
                continue
            name = key.value
            full = f"{where}.{name}" if where else name
            if name in out:
                self.err("F402", f"field `{_show(full)}` is given twice", self.span(key), label="given again here",
                         labels=[Label(self.span(out[name][0]), "first given here")])
                continue
            if name not in known:
                self.err("F402", f"unknown field `{_show(full)}`", self.span(key), label="unknown field",
                         help=did_you_mean(name, known) or f"known fields: {', '.join(f'`{k}`' for k in known)}")
                continue
            out[name] = (key, value)
        for name in required:
            if name not in out:
                full = f"{where}.{name}" if where else name
                self.err("F402", f"missing field `{full}`", anchor, label=f"`{name}` is missing here")
        return out

    def string(self, where: str, node: Node, *, nonempty: bool = True) -> str | None:
        if not (isinstance(node, ScalarNode) and node.tag == _STR):
            self.wrong(where, node, "a string",
                       help="quote it to make it a string" if isinstance(node, ScalarNode) and node.value else None)
            return None
        if nonempty and not node.value.strip():
            self.err("F402", f"`{where}` is empty", self.span(node), label="empty string")
            return None
        return node.value

    def name(self, where: str, node: Node) -> str | None:
        value = self.string(where, node)
        if value is None:
            return None
        if not _NAME.fullmatch(value):
            self.err("F402", f"`{where}` `{_show(value)}` is not a valid name", self.span(node),
                     label="not a name",
                     help="a name is letters, digits and `_`, not starting with a digit, "
                          "with single `.` or `-` between parts, e.g. `linux-base` or `debian-12.4`")
            return None
        return value

    def choice(self, where: str, node: Node, allowed: Iterable[str], what: str) -> str | None:
        value = self.string(where, node)
        if value is None:
            return None
        allowed = tuple(allowed)
        if value not in allowed:
            same_but_case = [a for a in allowed if a.lower() == value.lower()]
            hint = f"did you mean `{same_but_case[0]}`?" if same_but_case else did_you_mean(value, allowed)
            self.err("F402", f"unknown {what} `{_show(value)}`", self.span(node), label=f"not a {what}",
                     help=hint or f"one of {', '.join(f'`{a}`' for a in allowed)}")
            return None
        return value

    def count(self, where: str, node: Node) -> int | None:
        if not (isinstance(node, ScalarNode) and node.tag == _INT):
            self.wrong(where, node, "a whole number of vCPUs")
            return None
        if not _DECIMAL.fullmatch(node.value):
            # YAML 1.1 also reads 0x10, 0o17 and 1:30 as integers; nobody means that for a vCPU count.
            self.err("F402", f"`{where}` should be written in decimal", self.span(node), label="not decimal")
            return None
        digits = node.value.replace("_", "").lstrip("+")
        if digits.startswith("-") or not digits.strip("0"):
            self.err("F402", f"`{where}` should be at least 1", self.span(node), label="not a positive count")
            return None
        # Length first: int() of thousands of digits is slow, and past 4300 digits it raises.
        if len(digits.lstrip("0")) > len(str(MAX_VCPUS)) or int(digits) > MAX_VCPUS:
            self.err("F402", f"`{where}` is more vCPUs than any VM can have", self.span(node),
                     label=f"more than {MAX_VCPUS}")
            return None
        return int(digits)

    def size(self, where: str, node: Node) -> int | None:
        if not (isinstance(node, ScalarNode) and node.tag in (_STR, _INT, _FLOAT)):
            self.wrong(where, node, "a size, like `4GiB`")
            return None
        text = node.value
        try:
            parsed = parse_quantity(text)
        except (ValueError, OverflowError):  # a number too long for int() / float()
            parsed = (Dimension.BYTES, float("inf"))
        if parsed is None:
            unit = text.strip().lstrip("0123456789.").strip()
            hint = did_you_mean(unit, known_units(Dimension.BYTES)) if unit else None
            self.err("F402", f"`{where}` `{_show(text)}` is not a size", self.span(node), label="not a size",
                     help=hint or "write a number with a byte unit, like `512MiB` or `4GiB`")
            return None
        dim, value = parsed
        if dim is not Dimension.BYTES:
            self.err("F402", f"`{where}` needs a byte unit", self.span(node),
                     label="a plain number" if dim is Dimension.COUNT else f"a {dim.value}, not a size",
                     help="sizes are written like `512MiB` or `4GiB` (plain bytes: `B`)")
            return None
        # Compared before any float conversion: a 400-digit int does not fit in a float.
        if value > MAX_VALUE:
            self.err("F402", f"`{where}` is too large", self.span(node), label="too large")
            return None
        if isinstance(value, float) and not value.is_integer():
            self.err("F402", f"`{where}` is not a whole number of bytes", self.span(node),
                     label=f"{value:g} bytes")
            return None
        if value <= 0:
            self.err("F402", f"`{where}` should be more than zero", self.span(node), label="zero")
            return None
        return int(value)

    def strings_from(self, where: str, node: Node, allowed: Iterable[str], what: str, plural: str) -> list[str]:
        if not isinstance(node, SequenceNode):
            self.wrong(where, node, f"a list of {plural}", help=f"e.g. `{where}: [{sorted(allowed)[0]}]`")
            return []
        out: list[str] = []
        seen: dict[str, Node] = {}
        for item in node.value:
            value = self.choice(where, item, allowed, what)
            if value is None:
                continue
            if value in seen:
                # Harmless, but usually a copy-paste slip worth seeing.
                self.diags.append(warning("F402", f"{what} `{value}` is listed twice in `{where}`",
                                          self.span(item), label="listed again",
                                          labels=[Label(self.span(seen[value]), "first listed here")]))
                continue
            seen[value] = item
            out.append(value)
        return out

    # -- sections

    def source(self, key: ScalarNode, node: Node) -> tuple[str | None, Volume | None, Span | None]:
        f = self.fields(node, "source", ("path", "volume"), (), self.span(key))
        if f is None:
            return None, None, None
        if "path" in f and "volume" in f:
            later = max(f.values(), key=lambda kv: kv[0].start_mark.index)[0]
            self.err("F402", "`source` has both `path` and `volume`", self.span(later), label="give only one",
                     help="an image comes either from a file under the image root or from a pool volume")
            return None, None, None
        if not f:
            self.err("F402", "`source` needs a `path` or a `volume`", self.span(key), label="no source given",
                     help="e.g. `source: {path: linux-base.qcow2}`")
            return None, None, None
        if "path" in f:
            pnode = f["path"][1]
            text = self.string("source.path", pnode, nonempty=False)
            if text is None:
                return None, None, None
            span = self.span(pnode)
            problem = check_source_path(text, span)
            if problem is not None:
                self.failed = True
                self.diags.append(problem)
                return None, None, None
            return posixpath.normpath(text), None, span
        vkey, vnode = f["volume"]
        v = self.fields(vnode, "source.volume", ("pool", "name"), ("pool", "name"), self.span(vkey))
        if v is None:
            return None, None, None
        parts = {}
        for part in ("pool", "name"):
            if part not in v:
                continue
            value = self.string(f"source.volume.{part}", v[part][1])
            if value is not None and not _VOLUME_PART.fullmatch(value):
                self.err("F402", f"`source.volume.{part}` `{_show(value)}` is not a valid {part}",
                         self.span(v[part][1]), label="not a pool or volume name",
                         help="letters, digits, `_`, `.`, `+` and `-`, not starting with `.` or `-`")
                value = None
            parts[part] = value
        if parts.get("pool") is None or parts.get("name") is None:
            return None, None, None
        return None, Volume(parts["pool"], parts["name"]), self.span(vnode)

    def boot(self, key: ScalarNode, node: Node) -> Boot | None:
        f = self.fields(node, "boot", ("kernel", "initrd", "cmdline"), ("kernel",), self.span(key))
        if f is None:
            return None
        paths: dict[str, str | None] = {"kernel": None, "initrd": None}
        for part in paths:
            if part not in f:
                continue
            pnode = f[part][1]
            text = self.string(f"boot.{part}", pnode, nonempty=False)
            if text is None:
                continue
            problem = check_source_path(text, self.span(pnode))
            if problem is not None:
                self.failed = True
                self.diags.append(problem)
                continue
            paths[part] = posixpath.normpath(text)
        cmdline = self.string("boot.cmdline", f["cmdline"][1], nonempty=False) if "cmdline" in f else ""
        if paths["kernel"] is None or cmdline is None or ("initrd" in f and paths["initrd"] is None):
            return None
        return Boot(paths["kernel"], paths["initrd"], cmdline)

    def range(self, where: str, key: ScalarNode, node: Node, read) -> tuple[int | None, int | None]:
        f = self.fields(node, where, ("min", "max"), ("min", "max"), self.span(key))
        if f is None:
            return None, None
        lo = read(f"{where}.min", f["min"][1]) if "min" in f else None
        hi = read(f"{where}.max", f["max"][1]) if "max" in f else None
        if lo is not None and hi is not None and lo > hi:
            show = format_bytes if where == "resources.memory" else str
            self.err("F402", f"`{where}.min` ({show(lo)}) is greater than `{where}.max` ({show(hi)})",
                     self.span(f["min"][1]), label="greater than max",
                     labels=[Label(self.span(f["max"][1]), "max is here")])
            return None, None
        return lo, hi

    def ports(self, where: str, node: Node) -> list[DataPort]:
        if not isinstance(node, SequenceNode):
            self.wrong(where, node, "a list of `{name, type, format}` entries")
            return []
        out: list[DataPort] = []
        seen: dict[str, Span] = {}
        for i, item in enumerate(node.value):
            here = f"{where}[{i}]"
            f = self.fields(item, here, ("name", "type", "format"), ("name", "type"), self.first_line(item))
            if f is None:
                continue
            name = self.name(f"{here}.name", f["name"][1]) if "name" in f else None
            kind = self.choice(f"{here}.type", f["type"][1], DATA_TYPES, "data type") if "type" in f else None
            fmt = self.string(f"{here}.format", f["format"][1]) if "format" in f else None
            if name is None or kind is None or ("format" in f and fmt is None):
                continue
            span = self.span(f["name"][1])
            if name in seen:
                self.err("F402", f"`{name}` is listed twice in `{where}`", span, label="listed again",
                         labels=[Label(seen[name], "first listed here")])
                continue
            seen[name] = span
            out.append(DataPort(name, kind, fmt, span))
        return out

    # -- the document

    def image(self, root: Node) -> tuple[Image | None, str | None, Span | None]:
        """The image if the document is valid, and its id and id span whenever the id itself is."""
        f = self.fields(root, None, _TOP_FIELDS, _TOP_REQUIRED, self.first_line(root))
        if f is None:
            return None, None, None
        image_id = id_span = None
        if "id" in f:
            id_node = f["id"][1]
            image_id = self.name("id", id_node)
            id_span = self.span(id_node)
            if image_id is not None and image_id != self.stem:
                self.err("F404", f"image id `{image_id}` does not match its file name `{_show(self.stem)}`",
                         id_span, label=f"file is `{_show(self.stem)}`",
                         help=f"rename the file to `{image_id}.yaml`, or set `id: {_show(self.stem)}`")
        description = self.string("description", f["description"][1], nonempty=False) if "description" in f else ""
        os_name = self.string("os", f["os"][1]) if "os" in f else None
        path = volume = source_span = None
        if "source" in f:
            path, volume, source_span = self.source(*f["source"])
        boot = self.boot(*f["boot"]) if "boot" in f else None
        cpu = memory = (None, None)
        if "resources" in f:
            rkey, rnode = f["resources"]
            r = self.fields(rnode, "resources", ("cpu", "memory"), ("cpu", "memory"), self.span(rkey))
            if r is not None:
                if "cpu" in r:
                    cpu = self.range("resources.cpu", *r["cpu"], self.count)
                if "memory" in r:
                    memory = self.range("resources.memory", *r["memory"], self.size)
        caps = (self.strings_from("capabilities", f["capabilities"][1], sorted(CAPABILITIES), "capability",
                                    "capabilities") if "capabilities" in f else [])
        roles = self.strings_from("roles", f["roles"][1], ROLES, "role", "roles") if "roles" in f else []
        inputs = self.ports("inputs", f["inputs"][1]) if "inputs" in f else []
        outputs = self.ports("outputs", f["outputs"][1]) if "outputs" in f else []
        if self.failed:
            return None, image_id, id_span
        assert image_id is not None and os_name is not None and description is not None and id_span is not None
        return Image(
            id=image_id, description=description, os=os_name, source_path=path, source_volume=volume,
            cpu_min=cpu[0], cpu_max=cpu[1], memory_min=memory[0], memory_max=memory[1],
            capabilities=frozenset(caps), roles=tuple(roles), inputs=tuple(inputs), outputs=tuple(outputs),
            path=self.path, span=id_span, source_span=source_span, boot=boot,
        ), image_id, id_span


def _read_limited(path: Path) -> bytes:
    with path.open("rb") as fh:
        return fh.read(MAX_FILE_BYTES + 1)


def _read_file(read: Callable[[], bytes], display: str, sources: SourceSet,
               diags: list[Diagnostic]) -> tuple[bytes | None, Node | None, str]:
    """Raw bytes (for the fingerprint), the composed document if it is one, and the registered text."""
    try:
        data = read()[: MAX_FILE_BYTES + 1]
    except OSError as exc:
        diags.append(error("F405", f"cannot read image schema `{display}`: {exc.strerror or exc}", None))
        return None, None, ""
    if len(data) > MAX_FILE_BYTES:
        # Checked before decoding: the read stopped at the limit, possibly inside a multi-byte character.
        text = data.decode("utf-8", errors="replace")
        sources.add(display, text)
        diags.append(error("F401", f"image schema is larger than {format_bytes(MAX_FILE_BYTES)}",
                           Span(display, 0, 0), label="file too large"))
        return data, None, text
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = data.decode("utf-8", errors="replace")
        sources.add(display, text)
        # The bytes before the first bad one decode cleanly, so their length is the character offset.
        at = len(data[: exc.start].decode("utf-8"))
        diags.append(error("F401", "image schema is not UTF-8 text", Span(display, at, at + 1),
                           label=f"byte 0x{data[exc.start]:02x} is not UTF-8"))
        return data, None, text
    sources.add(display, text)
    try:
        node = _compose(text)
    except _Refused as exc:
        diags.append(error("F401", exc.message, Span(display, exc.index, min(exc.index + 1, len(text))),
                           label="refused here", help=exc.help))
        return data, None, text
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = mark.index if mark is not None else 0
        what = _show(exc.problem or "invalid YAML", 120)
        diags.append(error("F401", f"image schema is not valid YAML: {what}",
                           Span(display, at, min(at + 1, len(text))), label=what,
                           help=_show(exc.context, 120) if exc.context else None))
        return data, None, text
    except yaml.reader.ReaderError as exc:
        at = exc.position
        diags.append(error("F401", "image schema contains a character YAML does not allow",
                           Span(display, at, min(at + 1, len(text))), label=f"character U+{exc.character:04X}"
                           if isinstance(exc.character, int) else "not allowed"))
        return data, None, text
    except (yaml.YAMLError, RecursionError) as exc:  # defensive: any other refusal of the parser
        diags.append(error("F401", f"image schema is not valid YAML: {_show(str(exc), 120)}", Span(display, 0, 0)))
        return data, None, text
    if node is None:
        diags.append(error("F401", "image schema is empty", Span(display, 0, 0), label="no document",
                           help="an image schema is a mapping with at least `id`, `os`, `source` and `resources`"))
        return data, None, text
    if not isinstance(node, MappingNode):
        at = node.start_mark.index
        end = text.find("\n", at)
        diags.append(error("F401", f"image schema should be a mapping, not {_kind(node)}",
                           Span(display, at, len(text) if end == -1 else end), label="expected `field: value` lines"))
        return data, None, text
    return data, node, text


@runtime_checkable
class SchemaFolder(Protocol):
    """A folder of image schemas that is not a directory on disk, such as a folder of one git revision.
    `str()` of it names the folder in messages."""

    def schemas(self) -> list[tuple[str, str, bytes]]:
        """(file name, name in diagnostics, content) of each `*.yaml` and `*.yml` file directly in the folder,
        in file name order. Raises FileNotFoundError when the folder does not exist, OSError when it cannot be
        read."""


def _schema_files(directory: Path | SchemaFolder) -> list[tuple[str, str, Callable[[], bytes]]]:
    """(file name, name in diagnostics, reader) of each schema file of a folder, in file name order."""
    if isinstance(directory, SchemaFolder):
        return [(name, display, lambda data=data: data) for name, display, data in directory.schemas()]
    directory = Path(directory)
    paths = sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    return [(p.name, str(p), lambda p=p: _read_limited(p)) for p in paths]


def load_catalog(dirs: list[Path | SchemaFolder], sources: SourceSet, *,
                 require_dirs: bool = False) -> tuple[Catalog, list[Diagnostic]]:
    """Every image schema in `dirs` (in order; an id in an earlier folder shadows the same id in later
    ones, and two definitions in one folder are an F403 error), validated. A folder is a directory on disk
    or a `SchemaFolder`.

    Each file's text goes into `sources` so diagnostics can be rendered. Directories that do not exist are
    skipped, unless `require_dirs` asks for an F405 error about them. An image with any error is left out
    of the catalog; the diagnostics say why.
    """
    diags: list[Diagnostic] = []
    images: dict[str, Image] = {}
    first: dict[str, tuple[int, Span]] = {}
    broken: set[str] = set()
    digest = hashlib.sha256(_SCHEMA_VERSION)
    for index, directory in enumerate(dirs):
        try:
            entries = _schema_files(directory)
        except FileNotFoundError:
            if require_dirs:
                diags.append(error("F405", f"image directory `{directory}` does not exist", None))
            continue
        except OSError as exc:
            diags.append(error("F405", f"cannot read image directory `{directory}`: {exc.strerror or exc}", None))
            continue
        for name, display, read in entries:
            data, root, text = _read_file(read, display, sources, diags)
            # Names and order count too: the id comes from the file name, and earlier directories win. So
            # does the name in diagnostics: images and the checks cached against this catalog point there.
            digest.update(f"\0{index}\0{name}\0{display}\0".encode("utf-8", "surrogateescape"))
            digest.update(len(data).to_bytes(8, "big") + data if data is not None else b"\xff" * 8)
            if root is None:
                continue
            check = _FileCheck(display, posixpath.splitext(name)[0], text, diags)
            image, image_id, id_span = check.image(root)
            if image_id is None or id_span is None:
                continue
            if image_id in first:
                # An earlier folder shadows a later one (a program's own images/ may override the built-in
                # catalog); two definitions in one folder are a mistake.
                if first[image_id][0] == index:
                    diags.append(error("F403", f"image `{image_id}` is already defined", id_span,
                                       label="defined again here",
                                       labels=[Label(first[image_id][1], "first defined here")],
                                       help="the first definition wins; remove or rename this one"))
                continue
            first[image_id] = (index, id_span)
            if image is not None:
                images[image_id] = image
            else:
                broken.add(image_id)
    return Catalog(images, digest.hexdigest(), frozenset(broken)), diags


def load_builtin(sources: SourceSet) -> tuple[Catalog, list[Diagnostic]]:
    """The catalog shipped in specs/images."""
    return load_catalog([BUILTIN_DIR], sources, require_dirs=True)
