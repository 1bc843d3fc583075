"""The whole pipeline: find a program's files, then parse -> resolve -> build the graph -> validate.

A `Compiler` is a session. It remembers each file's parse and per-file checks under the hash of its
content (and of the image catalog), so compiling a program again after one file changed re-reads that file
only; linking and the graph are rebuilt from cached pieces. Stages stop at the first one with errors so that
one mistake does not cascade into many.

Where a program finds its image schemas, first match winning on a duplicate id:
  1. the `images/` folder inside the program's directory,
  2. folders given with `--images DIR` (in order),
  3. folders in the `VMFLOW_IMAGES` environment variable (separated by `:`),
  4. the catalog shipped with vmflow (`specs/images/`).
"""

from __future__ import annotations

import gc
import hashlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from compiler import ast as A
from compiler import model as M
from compiler import parser, resolve, validate
from compiler.diagnostics import Diagnostic, error, has_errors, sort
from compiler.graph import FlowGraph, build
from compiler.images import Catalog, load_catalog
from compiler.source import SourceSet

# Below this much new text, starting worker processes costs more than it saves.
PARALLEL_MIN_BYTES = 512 * 1024
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
            self._graph = build(self.program)
        return self._graph


@dataclass
class _Entry:
    """What the cache keeps for one file version."""

    ast: A.FileAst | None
    diagnostics: list[Diagnostic]
    unit: resolve.FileUnit | None = None
    checked: dict[str, list[Diagnostic]] = field(default_factory=dict)  # catalog fingerprint -> diagnostics


def image_dirs(program_dir: Path, extra: list[Path] | tuple = ()) -> list[Path]:
    dirs = [program_dir / "images", *extra]
    env = os.environ.get("VMFLOW_IMAGES", "")
    dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs.append(BUILTIN_IMAGES)
    return dirs


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


def _flow_files(directory: Path) -> list[Path]:
    """The `.flow` files directly in a folder, in name order."""
    with os.scandir(directory) as it:
        names = sorted(e.name for e in it if e.name.endswith(EXTENSION) and e.is_file())
    return [directory / n for n in names]


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


class Compiler:
    def __init__(self, images: list[Path] | tuple = ()) -> None:
        self.extra_images = list(images)
        self._cache: dict[tuple[str, str], _Entry] = {}
        self._catalogs: dict[tuple, tuple[Catalog, list[Diagnostic], SourceSet]] = {}

    # -- files
    def _entries(self, items: list[tuple[str, bytes]], sources: SourceSet) -> dict[str, _Entry]:
        """Decode, parse and lower every file, from the cache where the content is unchanged."""
        out: dict[str, _Entry] = {}
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
                out[name] = entry
        for key, entry in _parse_all(todo):
            self._cache[key] = out[key[0]] = entry
        return out

    def catalog(self, program_dir: Path) -> tuple[Catalog, list[Diagnostic], SourceSet]:
        dirs = image_dirs(program_dir, self.extra_images)
        key = tuple((str(d), _dir_stamp(d)) for d in dirs)
        cached = self._catalogs.get(key)
        if cached is None:
            sources = SourceSet()
            cat, diags = load_catalog([d for d in dirs], sources)
            cached = self._catalogs[key] = (cat, diags, sources)
        return cached

    # -- programs
    def compile_path(self, path: Path, root: Path | None = None) -> Compilation:
        """Compile the program at `path` (a directory, or one file). Imports may not leave `root`:
        by default the git repository holding the program, or else the program's own folder."""
        path = path.resolve() if path.exists() else path
        root = (root or find_root(path if path.is_dir() else path.parent)).resolve()
        contents: dict[str, bytes] = {}
        diags: list[Diagnostic] = []
        for f in _flow_files(path) if path.is_dir() else [path]:
            try:
                data = f.read_bytes()
            except OSError as e:
                diags.append(error("F212", f"cannot read `{_display(f)}`: {e.strerror}", None))
                continue
            contents[_display(f)] = data
        program_dir = path if path.is_dir() else path.parent
        return self.compile_files(contents, program_dir, root, diags)

    def compile_files(self, contents: dict[str, bytes], program_dir: Path, root: Path,
                      diags: list[Diagnostic] | None = None) -> Compilation:
        with _no_gc():
            return self._compile(contents, program_dir, root, list(diags or []))

    def _compile(self, contents: dict[str, bytes], program_dir: Path, root: Path,
                 diags: list[Diagnostic]) -> Compilation:
        sources = SourceSet()
        entries: dict[str, _Entry] = {}
        batch = list(contents.items())
        while batch:  # the files given, then what they import, then what those import...
            new = self._entries(batch, sources)
            entries.update(new)
            batch = []
            for name, entry in new.items():
                diags.extend(entry.diagnostics)
                if entry.unit is None:
                    continue
                for imp in entry.unit.imports:
                    for target, tdata in self._imports(name, imp, root, diags):
                        if target not in entries and all(target != b[0] for b in batch):
                            batch.append((target, tdata))
        lines = sum(s.text.count("\n") + 1 for s in sources.values())
        comp = Compilation(str(program_dir), sorted(entries), sources, diags, lines=lines)
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
        catalog, cat_diags, cat_sources = self.catalog(program_dir)
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
                vd: list[Diagnostic] = []
                for vm in e.unit.vms:
                    vd.extend(validate.check_vm(vm, catalog))
                for ch in e.unit.chains:
                    vd.extend(validate.check_chain(ch, catalog))
                e.checked = {fp: vd}
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

    def _imports(self, importer: str, imp: A.Import, root: Path, diags: list[Diagnostic]):
        base = Path(importer).resolve().parent
        raw = imp.path.value
        target = (base / raw).resolve()
        if "\x00" in raw or not raw:
            diags.append(error("F212", "empty or invalid import path", imp.path.span, label="bad path"))
            return
        if not target.is_relative_to(root):
            where = os.path.relpath(root)
            where = "the current folder" if where == "." else f"`{where}`"
            diags.append(error("F212", f"import `{raw}` points outside the repository at {where}",
                               imp.path.span, label="outside the repository",
                               help="imports may only name files and folders inside the git repository that holds "
                                    "the program (outside git: inside the program's own folder)"))
            return
        if target.is_dir():
            files = _flow_files(target)
        elif target.is_file():
            files = [target]
        else:
            diags.append(error("F212", f"import `{raw}` not found", imp.path.span, label="no such file or folder"))
            return
        for f in files:
            try:
                yield _display(f), f.read_bytes()
            except OSError as e:
                diags.append(error("F212", f"cannot read `{_display(f)}`: {e.strerror}", imp.path.span))


def _parse_one(key: tuple[str, str], name: str, text: str) -> tuple[tuple[str, str], _Entry]:
    ast, diags = parser.parse(name, text)
    entry = _Entry(None, diags)
    if ast is not None:
        entry.unit = resolve.lower_file(ast)
    return key, entry


def _parse_chunk(chunk: list[tuple[tuple[str, str], str, str]]) -> list[tuple[tuple[str, str], _Entry]]:
    with _no_gc():
        return [_parse_one(*job) for job in chunk]


def _parse_all(todo: list[tuple[tuple[str, str], str, str]]):
    """Parse and lower files. A large batch is shared with forked workers, one per extra core; this process
    takes a share too, since its share costs no pickling on the way back."""
    workers = min(os.cpu_count() or 1, 8)
    size = sum(len(t) for _, _, t in todo)
    if workers < 2 or len(todo) < 2 * workers or size < PARALLEL_MIN_BYTES or not _can_fork():
        return [_parse_one(*job) for job in todo]
    chunks = [todo[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers - 1, mp_context=multiprocessing.get_context("fork")) as pool:
        others = pool.map(_parse_chunk, chunks[1:])
        mine = _parse_chunk(chunks[0])
        return mine + [r for part in others for r in part]


def _can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods() and os.environ.get("VMFLOW_NO_FORK") is None


@contextmanager
def _no_gc():
    """Compiling allocates many small objects that form no cycles: the cyclic collector only costs time
    there (about a third of the parse), so it is paused for the duration."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _dir_stamp(d: Path) -> tuple:
    """Changes when any schema file in the folder changes (name, size, mtime)."""
    try:
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir()
                            if p.suffix in (".yaml", ".yml")))
    except OSError:
        return ()

