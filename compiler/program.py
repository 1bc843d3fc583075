"""The whole pipeline: find a program's files, then parse -> resolve -> build the graph -> validate.

A `Compiler` is a session. It remembers each file's parse and per-file checks under the hash of its
content (and of the image catalog), so compiling a program again after one file changed re-reads that file
only; linking and the graph are rebuilt from cached pieces. Stages stop at the first one with errors so that
one mistake does not cascade into many.

A program is read from a `Tree`: the filesystem below the repository's top (`compile_path`), or one revision
of a git repository read straight from its objects (`compile_tree`, fed by controller/gitsource.py). Files are
named in diagnostics relative to the working folder for the filesystem, and relative to the repository's top
for a revision, so that a pull-request annotation points at the right file. Since the cache is keyed by that
name and the content's hash, compiling revision B after revision A re-parses only the files that changed.
The cache keeps the file versions that the last few compilations used, so a long-lived compiler following a
repository does not keep every version it ever parsed.

A large batch of new files is parsed by this process and forked workers together (one per core), each
sending back the lowered units of its share.

Where a program finds its image schemas, first match winning on a duplicate id:
  1. the `images/` folder inside the program's directory (in the tree the program is read from),
  2. folders given with `--images DIR` (in order),
  3. folders in the `VMFLOW_IMAGES` environment variable (separated by `:`),
  4. the catalog shipped with vmflow (`specs/images/`).
"""

from __future__ import annotations

import copyreg
import dataclasses
import gc
import hashlib
import io
import os
import pickle
import posixpath
import signal
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from operator import attrgetter
from pathlib import Path
from typing import Protocol

from compiler import ast as A
from compiler import diagnostics as D
from compiler import parser, resolve, validate
from compiler import model as M
from compiler.diagnostics import Diagnostic, error, has_errors, sort
from compiler.graph import FlowGraph, build
from compiler.images import Catalog, load_catalog
from compiler.source import SourceSet

# Below this much new text, starting worker processes costs more than it saves.
PARALLEL_MIN_BYTES = 512 * 1024
# This process's share of a parallel parse, relative to each worker's: a worker's results cost it time to
# send (and this process time to receive), and a forked worker runs a little slower at first while it copies
# the pages it writes to.
SHARE_HERE = 1.2
BUILTIN_IMAGES = Path(__file__).resolve().parent.parent / "specs" / "images"
EXTENSION = ".flow"


@dataclass
class Compilation:
    """The result of compiling one program: everything built, and every diagnostic, sorted."""

    root: str
    files: list[str]
    sources: SourceSet
    diagnostics: list[Diagnostic]
    program: M.Program | None = None
    catalog: Catalog | None = None
    lines: int = 0
    _graph: FlowGraph | None = None

    @property
    def ok(self) -> bool:
        return not has_errors(self.diagnostics)

    @property
    def graph(self) -> FlowGraph | None:
        """The FlowGraph, built on first use: the checks run on each chain's own small DAG, so
        validating alone never pays for the whole graph. None when the program has errors."""
        if self._graph is None and self.program is not None and self.ok:
            with _no_gc():
                self._graph = build(self.program)
        return self._graph


@dataclass
class _Entry:
    """What the cache keeps for one file version."""

    ast: A.FileAst | None
    diagnostics: list[Diagnostic]
    unit: resolve.FileUnit | None = None
    checked: dict[str, list[Diagnostic]] = field(default_factory=dict)  # catalog fingerprint -> diagnostics
    used: int = 0  # the last compilation that used it


FILE, DIR = "file", "dir"
# Compiled catalogs kept per compiler: one per distinct set of schema folders and contents. A long-lived
# compiler following a repository sees a new set whenever a revision changes a schema, so the oldest go.
MAX_CATALOGS = 32
# File versions kept per compiler: those used by any of the last this many compilations. A controller
# following a repository compiles each revision, and each revision changes a few files: without a bound it
# would keep every version of every file it ever parsed. A few compilations back covers a controller that
# compiles several programs, or goes back and forth between two revisions.
KEEP_COMPILATIONS = 8


class Tree(Protocol):
    """A read-only folder tree a program is read from: the filesystem below a root (`FileTree`) or one revision
    of a git repository (controller/gitsource.py).

    Paths are posix and relative to the tree's root, already normalised: "" is the root itself, and there is
    no `.`, `..` or leading `/`. `list` and `read` raise OSError for what cannot be listed or read (the
    compiler reports it as F212); any other exception, such as a git repository that cannot read its own
    objects, ends the compilation and reaches the caller, since it says nothing about the program.

    A tree may have a `label` attribute naming its root in messages ("the current folder", "revision 1a2b3c4").
    """

    def kind(self, path: str) -> str | None:
        """"file", "dir", or None when nothing is there (or it is neither, e.g. a git submodule)."""

    def list(self, directory: str) -> list[str]:
        """The names directly in a folder, in any order."""

    def read(self, path: str) -> bytes:
        """A file's content."""


class FileTree:
    """The filesystem below `root` (an absolute, resolved path). Symlinks are followed, but as in a git
    repository nothing outside the root exists for the tree: a link that leaves it reads as missing."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self._inside = self.root if self.root.endswith(os.sep) else self.root + os.sep
        self._cwd = os.getcwd()
        # Kinds seen while listing folders, from the directory entries (no extra system call). Links are left
        # out: they need the check against the root that `kind` makes.
        self._kinds: dict[str, str] = {}
        rel = _display_dir(self.root, self._cwd)
        self.label = "the current folder" if rel == "" else f"`{rel}`"

    def full(self, path: str) -> str:
        return os.path.join(self.root, path) if path else self.root

    def kind(self, path: str) -> str | None:
        known = self._kinds.get(path)
        if known is not None:
            return known
        real = os.path.realpath(self.full(path))
        if real != self.root and not real.startswith(self._inside):
            return None
        if os.path.isdir(real):
            return DIR
        return FILE if os.path.isfile(real) else None

    def list(self, directory: str) -> list[str]:
        prefix = f"{directory}/" if directory else ""
        names = []
        with os.scandir(self.full(directory)) as it:
            for e in it:
                names.append(e.name)
                if not e.is_symlink():
                    if e.is_file():
                        self._kinds[prefix + e.name] = FILE
                    elif e.is_dir():
                        self._kinds[prefix + e.name] = DIR
        return names

    def read(self, path: str) -> bytes:
        with open(self.full(path), "rb") as fh:
            return fh.read()

    def display(self, path: str) -> str:
        """How diagnostics name a file of the tree: relative to the working folder."""
        directory, _, name = path.rpartition("/")
        return os.path.join(_display_dir(self.full(directory), self._cwd), name)

    def relative(self, path: Path) -> str | None:
        """The tree path of a filesystem path, or None when it is not inside the root."""
        rel = os.path.relpath(path, self.root)
        if rel == ".":
            return ""
        if rel == ".." or rel.startswith(".." + os.sep) or os.path.isabs(rel):
            return None
        return rel.replace(os.sep, "/")


class _TreeImages:
    """A program's `images/` folder inside a tree, as a schema folder for `load_catalog`."""

    def __init__(self, tree: Tree, directory: str) -> None:
        self.tree = tree
        self.directory = directory
        self._files: list[tuple[str, str, bytes]] | None = None

    def __str__(self) -> str:
        return self.directory

    def schemas(self) -> list[tuple[str, str, bytes]]:
        if self._files is None:
            if self.tree.kind(self.directory) != DIR:
                raise FileNotFoundError(self.directory)
            files = []
            for name in sorted(self.tree.list(self.directory)):
                path = f"{self.directory}/{name}"
                if posixpath.splitext(name)[1] in (".yaml", ".yml") and self.tree.kind(path) == FILE:
                    files.append((name, path, self.tree.read(path)))
            self._files = files
        return self._files

    def stamp(self) -> tuple:
        """Changes whenever any schema's name or content does: two revisions with different YAML never
        share a cached catalog."""
        try:
            files = self.schemas()
        except OSError as exc:
            return ("unreadable", type(exc).__name__)
        digest = hashlib.blake2b(digest_size=16)
        for name, _, data in files:
            digest.update(f"{name}\0{len(data)}\0".encode("utf-8", "surrogateescape"))
            digest.update(data)
        return (digest.hexdigest(),)


def _search_dirs(extra: list[Path] | tuple = ()) -> list[Path]:
    """Where schemas are found after the program's own `images/` folder."""
    env = os.environ.get("VMFLOW_IMAGES", "")
    return [*extra, *(Path(p) for p in env.split(os.pathsep) if p), BUILTIN_IMAGES]


def image_dirs(program_dir: Path, extra: list[Path] | tuple = ()) -> list[Path]:
    return [program_dir / "images", *_search_dirs(extra)]


def discover(paths: list[Path]) -> tuple[list[Path], list[Diagnostic]]:
    """Each directory holding `.flow` files is one program; a file given alone is a program of its own."""
    programs: list[Path] = []
    diags = []
    for p in paths:
        if p.is_file():
            programs.append(p)
        elif p.is_dir():
            found = sorted({f.parent for f in _walk(p)})
            if not found:
                diags.append(error("F212", f"no `{EXTENSION}` files in `{p}`", None))
            programs.extend(found)
        else:
            diags.append(error("F212", f"`{p}` does not exist", None))
    return programs, diags


def find_root(start: Path) -> Path:
    """The top of the git repository holding `start`, or `start` itself outside any repository."""
    start = start.resolve()
    for d in (start, *start.parents):
        if (d / ".git").exists():
            return d
    return start


def _walk(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in ("node_modules", "__pycache__"))
        for f in sorted(filenames):
            if f.endswith(EXTENSION):
                yield Path(dirpath) / f


def _flow_files(tree: Tree, directory: str) -> list[str]:
    """The `.flow` files directly in a folder of a tree, in name order."""
    prefix = f"{directory}/" if directory else ""
    return [prefix + n for n in sorted(tree.list(directory))
            if n.endswith(EXTENSION) and tree.kind(prefix + n) == FILE]


def _normal(path: str) -> str | None:
    """A tree path in normal form, or None when it leaves the tree (absolute, or climbing above the root)."""
    if path.startswith("/"):
        return None
    path = posixpath.normpath(path)
    if path == ".":
        return ""
    if path == ".." or path.startswith("../"):
        return None
    return path


def _display(path: Path) -> str:
    """How a file is named in diagnostics: relative to the working folder. Computed per folder, since a
    large program has many files in few folders."""
    return os.path.join(_display_dir(str(path.parent), os.getcwd()), path.name)


@lru_cache(maxsize=1024)
def _display_dir(directory: str, cwd: str) -> str:
    try:
        rel = os.path.relpath(directory, cwd)
    except ValueError:  # pragma: no cover - another drive on Windows
        return directory
    return "" if rel == "." else rel


def _same(name: str) -> str:
    return name


class Compiler:
    def __init__(self, images: list[Path] | tuple = ()) -> None:
        self.extra_images = list(images)
        self._cache: OrderedDict[tuple[str, str], _Entry] = OrderedDict()  # least recently used first
        self._compilations = 0
        self._catalogs: dict[tuple, tuple[Catalog, list[Diagnostic], SourceSet]] = {}

    # -- files
    def _entries(self, items: list[tuple[str, bytes]], sources: SourceSet,
                 catalog: Callable[[], Catalog] | None = None) -> dict[str, _Entry]:
        """Decode, parse and lower every file, from the cache where the content is unchanged. `catalog`
        gives the image catalog when a large batch is shared with workers: they check their files against
        it too."""
        out: dict = {}
        todo: list[tuple[tuple[str, str], str, str]] = []
        for name, data in items:
            key = (name, hashlib.blake2b(data, digest_size=16).hexdigest())
            text, diags = parser.decode(name, data)
            if text is None:
                sources.add(name, data.decode("utf-8", errors="replace"))
                out[name] = _Entry(None, diags)
                continue
            sources.add(name, text)
            entry = self._cache.get(key)
            if entry is None:
                todo.append((key, name, text))
            else:
                entry.used = self._compilations
                self._cache.move_to_end(key)
            out[name] = entry  # a placeholder keeps the files in the order given
        for key, entry in _parse_all(todo, catalog):
            entry.used = self._compilations
            self._cache[key] = out[key[0]] = entry
        return out

    def _forget_old(self) -> None:
        """Drop the file versions no recent compilation used (the cache is in order of last use)."""
        oldest = self._compilations - KEEP_COMPILATIONS
        cache = self._cache
        while cache:
            key = next(iter(cache))
            if cache[key].used > oldest:
                break
            del cache[key]

    def catalog(self, program_dir: Path) -> tuple[Catalog, list[Diagnostic], SourceSet]:
        return self._catalog(image_dirs(program_dir, self.extra_images))

    def _catalog(self, dirs: list) -> tuple[Catalog, list[Diagnostic], SourceSet]:
        key = tuple(("path", str(d), _dir_stamp(d)) if isinstance(d, Path) else ("tree", str(d), d.stamp())
                    for d in dirs)
        cached = self._catalogs.get(key)
        if cached is None:
            sources = SourceSet()
            cat, diags = load_catalog(list(dirs), sources)
            cached = self._catalogs[key] = (cat, diags, sources)
            while len(self._catalogs) > MAX_CATALOGS:
                del self._catalogs[next(iter(self._catalogs))]
        return cached

    # -- programs
    def compile_path(self, path: Path, root: Path | None = None) -> Compilation:
        """Compile the program at `path` (a directory, or one file). Imports may not leave `root`:
        by default the git repository holding the program, or else the program's own folder."""
        path = path.resolve() if path.exists() else path
        program_dir = path if path.is_dir() else path.parent
        root = (root or find_root(program_dir)).resolve()
        tree = FileTree(root)
        where = tree.relative(program_dir)
        if where is None:  # a root that does not hold the program confines imports to the program's folder
            tree, where = FileTree(program_dir.resolve()), ""
        contents: dict[str, bytes] = {}
        paths: dict[str, str] = {}
        diags: list[Diagnostic] = []
        if path.is_dir():
            try:
                names = _flow_files(tree, where)
            except OSError as e:
                names = []
                diags.append(error("F212", f"cannot read `{_display_dir(str(path), os.getcwd()) or '.'}`: "
                                           f"{e.strerror}", None))
            for p in names:
                name = tree.display(p)
                paths[name] = p
                try:
                    contents[name] = tree.read(p)
                except OSError as e:
                    diags.append(error("F212", f"cannot read `{name}`: {e.strerror}", None))
        else:
            name = _display(path)
            paths[name] = f"{where}/{path.name}" if where else path.name
            try:
                contents[name] = path.read_bytes()
            except OSError as e:
                diags.append(error("F212", f"cannot read `{name}`: {e.strerror}", None))
        with _no_gc():
            return self._compile(tree, contents, paths, str(program_dir), image_dirs(program_dir, self.extra_images),
                                 tree.display, diags)

    def compile_files(self, contents: dict[str, bytes], program_dir: Path, root: Path,
                      diags: list[Diagnostic] | None = None) -> Compilation:
        """Compile files given by content, named as diagnostics should name them (relative to the working
        folder); their imports are read from the filesystem below `root`."""
        tree = FileTree(root.resolve())
        paths = {}
        for name in contents:
            rel = tree.relative(Path(name).resolve())
            # A file outside the root can still be compiled; each of its imports is reported as leaving it.
            paths[name] = rel if rel is not None else f"../{name}"
        with _no_gc():
            return self._compile(tree, contents, paths, str(program_dir), image_dirs(program_dir, self.extra_images),
                                 tree.display, list(diags or []))

    def compile_tree(self, tree: Tree, program: str) -> Compilation:
        """Compile the program at `program` in `tree`: a folder (its `.flow` files) or one file. Imports are
        read from the same tree and may not leave it; image schemas come first from the program folder's
        `images/` in the tree, then from the folders on disk that `compile_path` searches too. Files are
        named by their tree path (`apps/web/main.flow`)."""
        label = getattr(tree, "label", "the tree")
        where = _normal(program)
        if where is None:
            return Compilation(program, [], SourceSet(), [error("F212", f"`{program}` is outside {label}", None)])
        kind = tree.kind(where)
        diags: list[Diagnostic] = []
        contents: dict[str, bytes] = {}
        program_dir = where if kind == DIR else posixpath.dirname(where)
        if kind is None:
            diags.append(error("F212", f"`{where or '.'}` does not exist in {label}", None))
        elif kind == DIR:
            try:
                names = _flow_files(tree, where)
            except OSError as e:
                names = []
                diags.append(error("F212", f"cannot read `{where or '.'}`: {e.strerror}", None))
            if not names and not diags:
                diags.append(error("F212", f"no `{EXTENSION}` files in `{where or '.'}` in {label}", None))
        else:
            names = [where]
        for p in names if kind is not None else ():
            try:
                contents[p] = tree.read(p)
            except OSError as e:
                diags.append(error("F212", f"cannot read `{p}`: {e.strerror}", None))
        images = _TreeImages(tree, f"{program_dir}/images" if program_dir else "images")
        with _no_gc():
            return self._compile(tree, contents, {p: p for p in contents}, program_dir,
                                 [images, *_search_dirs(self.extra_images)], _same, diags)

    def _compile(self, tree: Tree, contents: dict[str, bytes], paths: dict[str, str], program_dir: str,
                 image_folders: list, name_of: Callable[[str], str], diags: list[Diagnostic]) -> Compilation:
        """`contents` and `paths` map each file's name in diagnostics to its content and its tree path;
        `name_of` names the files that imports add."""
        self._compilations += 1
        self._forget_old()
        sources = SourceSet()
        entries: dict[str, _Entry] = {}
        paths = dict(paths)
        batch = list(contents.items())
        while batch:  # the files given, then what they import, then what those import...
            new = self._entries(batch, sources, lambda: self._catalog(image_folders)[0])
            entries.update(new)
            batch = []
            for name, entry in new.items():
                diags.extend(entry.diagnostics)
                if entry.unit is None:
                    continue
                for imp in entry.unit.imports:
                    for target in self._imports(tree, paths[name], imp, diags):
                        tname = name_of(target)
                        if tname in paths:
                            continue
                        try:
                            data = tree.read(target)
                        except OSError as e:
                            diags.append(error("F212", f"cannot read `{tname}`: {e.strerror}", imp.path.span))
                            continue
                        paths[tname] = target
                        batch.append((tname, data))
        lines = sum(s.text.count("\n") + 1 for s in sources.values())
        comp = Compilation(program_dir, sorted(entries), sources, diags, lines=lines)
        if has_errors(diags):
            comp.diagnostics = sort(diags)
            return comp
        units = [e.unit for e in entries.values() if e.unit is not None]
        for u in units:
            diags.extend(u.diagnostics)
        program, link_diags = resolve.link(units)
        diags.extend(link_diags)
        if has_errors(diags):
            comp.diagnostics = sort(diags)
            return comp
        catalog, cat_diags, cat_sources = self._catalog(image_folders)
        sources.update(cat_sources)
        diags.extend(cat_diags)
        comp.catalog = catalog
        # Per-file checks are cached with the catalog they ran against; template instances and the
        # checks across blocks run every time.
        fp = catalog.fingerprint
        file_blocks = set()
        for e in entries.values():
            if e.unit is None:
                continue
            if fp not in e.checked:
                e.checked = {fp: _check_file(e.unit, catalog)}
            diags.extend(e.checked[fp])
            file_blocks.update(id(v) for v in e.unit.vms)
            file_blocks.update(id(c) for c in e.unit.chains)
        for vm in program.vms.values():
            if id(vm) not in file_blocks:
                diags.extend(validate.check_vm(vm, catalog))
        for ch in program.chains.values():
            if id(ch) not in file_blocks:
                diags.extend(validate.check_chain(ch, catalog))
        diags.extend(validate.check_program(program, catalog))
        comp.program = program
        comp.diagnostics = sort(diags)
        return comp

    def _imports(self, tree: Tree, importer: str, imp: A.Import, diags: list[Diagnostic]):
        """The tree paths of the files an import names, relative to the importing file's folder."""
        raw = imp.path.value
        if "\x00" in raw or not raw:
            diags.append(error("F212", "empty or invalid import path", imp.path.span, label="bad path"))
            return
        target = _normal(posixpath.join(posixpath.dirname(importer), raw))
        if target is None:
            where = getattr(tree, "label", "its root")
            diags.append(error("F212", f"import `{raw}` points outside the repository at {where}",
                               imp.path.span, label="outside the repository",
                               help="imports may only name files and folders inside the git repository that holds "
                                    "the program (outside git: inside the program's own folder)"))
            return
        kind = tree.kind(target)
        if kind == DIR:
            try:
                yield from _flow_files(tree, target)
            except OSError as e:
                diags.append(error("F212", f"cannot read `{raw}`: {e.strerror}", imp.path.span))
        elif kind == FILE:
            yield target
        else:
            diags.append(error("F212", f"import `{raw}` not found", imp.path.span, label="no such file or folder"))


def _parse_one(key: tuple[str, str], name: str, text: str,
               catalog: Catalog | None = None) -> tuple[tuple[str, str], _Entry]:
    ast, diags = parser.parse(name, text)
    entry = _Entry(None, diags)
    if ast is not None:
        entry.unit = resolve.lower_file(ast)
        # The checks assume a file that resolved: with errors, the compilation stops before them anyway.
        if catalog is not None and not has_errors(entry.unit.diagnostics):
            entry.checked = {catalog.fingerprint: _check_file(entry.unit, catalog)}
    return key, entry


def _check_file(unit: resolve.FileUnit, catalog: Catalog) -> list[Diagnostic]:
    """The checks of a file's own blocks against the catalog: cached with the file."""
    out: list[Diagnostic] = []
    for vm in unit.vms:
        out.extend(validate.check_vm(vm, catalog))
    for ch in unit.chains:
        out.extend(validate.check_chain(ch, catalog))
    return out


def _parse_all(todo: list[tuple[tuple[str, str], str, str]],
               catalog: Callable[[], Catalog] | None = None) -> list[tuple[tuple[str, str], _Entry]]:
    """Parse and lower files, in the order given. A large batch is shared with forked workers, one per extra
    core: each inherits the texts, parses its share, checks its files against the catalog, and sends back
    the results; this process takes a share too, the largest, since its share costs nothing to send. A
    worker that fails for any reason has its share parsed here instead, so the outcome never depends on the
    workers."""
    workers = _cores()
    size = sum(len(t) for _, _, t in todo)
    if workers < 2 or len(todo) < 2 * workers or size < PARALLEL_MIN_BYTES or not _can_fork():
        return [_parse_one(*job) for job in todo]
    try:
        # Loading it first costs little (it is cached), and the checks it allows are then shared too. Should
        # it fail, it fails again where the compilation needs it, and is reported there.
        cat = catalog() if catalog is not None else None
    except Exception:
        cat = None
    mine, *theirs = _shares(todo, workers)
    children = []
    results: dict[int, tuple[tuple[str, str], _Entry]] = {}
    try:
        for share in theirs:
            children.append((share, _fork(todo, share, cat)))
        for i in mine:
            results[i] = _parse_one(*todo[i], cat)
    except BaseException:  # an interrupt, or a bug in this share: the workers' results will not be needed
        for _, child in children:
            _abandon(child)
        raise
    sent: list = []
    try:
        for share, child in children:
            sent.append((share, _collect(child)))
    except BaseException:
        for _, child in children[len(sent) + 1:]:
            _abandon(child)
        raise
    for share, got in sent:
        if got is None or len(got) != len(share):
            got = [_parse_one(*todo[i], cat) for i in share]
        results.update(zip(share, got))
    return [results[i] for i in range(len(todo))]


def _cores() -> int:
    try:
        return min(len(os.sched_getaffinity(0)), 8)
    except AttributeError:  # pragma: no cover - not on Linux
        return min(os.cpu_count() or 1, 8)


def _shares(todo: list[tuple[tuple[str, str], str, str]], workers: int) -> list[list[int]]:
    """Indices into `todo`, one list per process, balanced by text size. A worker's results cost it some
    time to send, and this process some to receive, so the first share, this process's own, is a little
    larger than the others."""
    weights = [SHARE_HERE] + [1.0] * (workers - 1)
    loads = [0] * workers
    shares: list[list[int]] = [[] for _ in range(workers)]
    for i in sorted(range(len(todo)), key=lambda i: -len(todo[i][2])):
        w = min(range(workers), key=lambda w: loads[w] / weights[w])
        shares[w].append(i)
        loads[w] += len(todo[i][2])
    return [sorted(share) for share in shares]


def _fork(todo: list[tuple[tuple[str, str], str, str]], share: list[int],
          catalog: Catalog | None) -> tuple[int, int] | None:
    """Start a worker on `share` of `todo`, which it inherits with the catalog. Returns its pid and the pipe
    its results arrive on, or None when it could not be started."""
    try:
        r, w = os.pipe()
    except OSError:
        return None
    try:
        pid = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        return None
    if pid:
        os.close(w)
        return pid, r
    # The worker. Whatever happens, it leaves through os._exit: it must not run the parent's exit handlers
    # or flush the parent's buffered output a second time. A worker that fails sends nothing.
    try:
        os.close(r)
        data = _pack([_parse_one(*todo[i], catalog) for i in share])
        with os.fdopen(w, "wb") as out:
            out.write(data)
    except BaseException:
        os._exit(1)
    os._exit(0)


def _collect(child: tuple[int, int] | None) -> list | None:
    """A worker's results, or None when it sent none. They are written in one piece once all are ready, so
    results that unpickle are complete whatever became of the worker afterwards."""
    if child is None:
        return None
    pid, r = child
    try:
        with os.fdopen(r, "rb") as f:
            data = f.read()
    except BaseException:
        _abandon((pid, None))
        raise
    _wait(pid)
    try:
        return pickle.loads(data) if data else None
    except Exception:  # a worker that died while writing
        return None


def _abandon(child: tuple[int, int | None] | None) -> None:
    if child is None:
        return
    pid, r = child
    if r is not None:
        os.close(r)
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:  # pragma: no cover - already gone
        pass
    _wait(pid)


def _wait(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:  # pragma: no cover - reaped already (SIGCHLD ignored, or a handler of its own)
        pass


# How a worker's results travel: the model's frozen dataclasses are rebuilt by calling the class with their
# fields, and spans as the tuples they are. Pickle's default for a slotted dataclass sets each field through
# Python code, which made receiving the results cost more than a tenth of parsing them.
def _dataclass_reducer(cls):
    names = [f.name for f in dataclasses.fields(cls)]
    if len(names) == 1:
        get = attrgetter(names[0])
        return lambda o: (cls, (get(o),))
    get = attrgetter(*names)
    return lambda o: (cls, get(o))


def _span_reducer(span: A.Span):
    return _tuple_new, (A.Span, tuple(span))


_tuple_new = tuple.__new__


@lru_cache(maxsize=1)
def _dispatch() -> dict:
    table = dict(copyreg.dispatch_table)
    for module in (A, M, D):
        for value in vars(module).values():
            if isinstance(value, type) and dataclasses.is_dataclass(value) and value.__module__ == module.__name__ \
                    and "__slots__" in vars(value) and all(f.init for f in dataclasses.fields(value)):
                table[value] = _dataclass_reducer(value)
    table[A.Span] = _span_reducer
    return table


def _pack(results) -> bytes:
    buf = io.BytesIO()
    p = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
    p.dispatch_table = _dispatch()
    p.dump(results)
    return buf.getvalue()


def _can_fork() -> bool:
    return hasattr(os, "fork") and os.environ.get("VMFLOW_NO_FORK") is None


@contextmanager
def _no_gc():
    """Compiling allocates many small objects that form no cycles: the cyclic collector only costs time
    there (about a third of the parse), so it is paused for the duration.

    What a compilation keeps (the program, spans, cached units) is long-lived and acyclic too. Left in the
    youngest generation, it would be traversed by the first collection after the pause and again by the
    next generation's, finding nothing: a tenth of a second for a large program. It is moved straight to the
    oldest generation instead (freezing then unfreezing does that without a traversal), which full
    collections still visit. Not when the application keeps objects frozen itself: unfreezing would release
    them too."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            if gc.get_freeze_count() == 0:
                gc.freeze()
                gc.unfreeze()
            gc.enable()


def _dir_stamp(d: Path) -> tuple:
    """Changes when any schema file in the folder changes (name, size, mtime)."""
    try:
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir()
                            if p.suffix in (".yaml", ".yml")))
    except OSError:
        return ()

