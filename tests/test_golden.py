"""Golden diagnostics: every code the compiler can emit, triggered by a small case whose expected
diagnostics are written in the case itself, and a snapshot of how they render.

Layout, under tests/golden/:

    flow/<CODE>-<slug>.flow       a program of one file
    flow/<CODE>-<slug>/           a program of several files (imports, duplicates across files)
    flow/syntax.flow              many tiny programs separated by lines holding only `---`; each chunk is
                                  compiled on its own, padded with blank lines so its line numbers are those
                                  of syntax.flow
    images/<CODE>-<slug>/         `main.flow` and an `images/` folder of YAML schemas, which the program
                                  searches before the built-in catalog
    workflow/<CODE>-<slug>.json   a JSON workflow given to `import_workflow`, expected diagnostics in
                                  `<case>.expect`
    cli/                          programs run through the real `vmflow validate`: the json and github
                                  renderings (snapshots `errors.*.stdout`) and the exit codes

Each case is named after the code it is about, and must raise that code (among others, perhaps). A limit
too large to reach with a committed file (64 MiB for a .flow file) is lowered for its one case in `PATCHES`.

Markers. In .flow and YAML files, a comment holding `ERROR[F201]` or `WARNING[F320]` says that a
diagnostic of that severity and code points at the line the comment is on. A line may hold several markers
separated by spaces (`# ERROR[F201] ERROR[F206]`). Two suffixes cover the places a comment cannot go:

    ERROR[F107]@L12       the diagnostic points at line 12 of this file (the end of the file, ...)
    ERROR[F405]@nowhere   the diagnostic has no location at all

`.expect` files (JSON has no comments) hold one diagnostic a line: `ERROR F502 7` is severity, code, line
(`-` for no location); blank lines and lines starting with `#` are ignored.

A case's diagnostics must equal its markers exactly, as a multiset of (file, line, severity, code): an
unmarked diagnostic fails the case just as a missing one does, and so does a diagnostic reported twice.

Snapshots. Beside each case, `<case>.stderr` holds its diagnostics as `compiler.render.render_human` writes
them without colour, with paths relative to the repository root (syntax.flow has one snapshot for all its
chunks). Run with `VMFLOW_BLESS=1` (`make bless`) to rewrite the snapshots instead of comparing them, then
read the diff as you would read code: each message clear, each caret under the right text.
"""

from __future__ import annotations

import collections
import importlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from compiler import render
from compiler.diagnostics import Diagnostic, has_errors
from compiler.program import Compiler
from compiler.source import SourceSet
from compiler.workflow import import_workflow

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
SYNTAX = GOLDEN / "flow" / "syntax.flow"
BLESS = os.environ.get("VMFLOW_BLESS") == "1"

MARKER = re.compile(r"\b(ERROR|WARNING)\[(F\d{3})\](?:@(L\d+|nowhere))?")
SEPARATOR = re.compile(r"^---[ \t]*$")
CODE_LITERAL = re.compile(r"""["'](F\d{3})["']""")
SPEC_HEADING = re.compile(r"^##\s+(F\d{3})\b", re.M)

# Limits too large to reach with a committed file, lowered for the one case that tests each.
PATCHES: dict[str, dict[str, int]] = {
    "flow/F106-file-too-large.flow": {"compiler.parser.MAX_FILE_BYTES": 64},
    "workflow/F501-too-large.json": {"compiler.workflow.MAX_FILE_BYTES": 64},
}

Key = tuple  # (file or None, line or None, severity, code)


# ------------------------------------------------------------------------------------------ markers


def rel(path: str | os.PathLike) -> str:
    """A path as the snapshots show it: relative to the repository root, with `/`."""
    p = Path(path)
    if p.is_absolute():
        try:
            p = p.relative_to(ROOT)
        except ValueError:
            return p.as_posix()
    return p.as_posix()


def markers_in(path: Path, first_line: int = 1, last_line: int | None = None) -> list[Key]:
    """The markers of one file (or of lines first_line..last_line of it)."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    out = []
    for number, line in enumerate(text.split("\n"), 1):
        if number < first_line or (last_line is not None and number > last_line):
            continue
        for sev, code, where in MARKER.findall(line):
            if where == "nowhere":
                out.append((None, None, sev.lower(), code))
            else:
                at = int(where[1:]) if where else number
                out.append((rel(path), at, sev.lower(), code))
    return out


def expect_file(path: Path, target: Path) -> list[Key]:
    out = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        sev, code, at = line.split()
        out.append((rel(target), None if at == "-" else int(at), sev.lower(), code))
    return out


def keys_of(diags: list[Diagnostic], sources: SourceSet) -> list[Key]:
    out = []
    for d in diags:
        line = None
        file = None
        if d.span is not None:
            file = rel(d.span.file)
            src = sources.get(d.span.file)
            line = src.line_col(d.span.start)[0] if src is not None else None
        out.append((file, line, d.severity.value, d.code))
    return out


def show(keys) -> list[str]:
    return sorted(f"{f or '-'}:{line or '-'} {sev} {code}" for f, line, sev, code in keys)


def assert_markers(diags: list[Diagnostic], sources: SourceSet, expected: list[Key], rendered: str) -> None:
    got = collections.Counter(keys_of(diags, sources))
    want = collections.Counter(expected)
    if got != want:
        missing = show((want - got).elements())
        unexpected = show((got - want).elements())
        pytest.fail("diagnostics differ from the markers\n"
                    f"  marked but not reported: {missing}\n"
                    f"  reported but not marked: {unexpected}\n\n{rendered}", pytrace=False)


# ------------------------------------------------------------------------------------------ snapshots


def rendered(diags: list[Diagnostic], sources: SourceSet) -> str:
    text = render.render_human(diags, sources, colour=False)
    # Image schemas are registered under absolute paths; snapshots must not depend on the checkout.
    return text.replace(f"{ROOT}{os.sep}", "")


def check_snapshot(path: Path, actual: str) -> None:
    if BLESS:
        if not path.exists() or path.read_text(encoding="utf-8") != actual:
            path.write_text(actual, encoding="utf-8")
        return
    if not path.exists():
        pytest.fail(f"no snapshot {rel(path)}; run `make bless` to create it", pytrace=False)
    expected = path.read_text(encoding="utf-8")
    if expected != actual:
        import difflib

        diff = "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True),
                                            f"{rel(path)} (snapshot)", "actual"))
        pytest.fail(f"rendering differs from {rel(path)}; if the change is right, run `make bless`\n{diff}",
                    pytrace=False)


# ------------------------------------------------------------------------------------------ cases


@dataclass
class Case:
    id: str  # e.g. "flow/F201-unknown-step.flow"; also the key of PATCHES
    path: Path
    snapshot: Path
    files: list[Path] = field(default_factory=list)  # where markers are read

    @property
    def code(self) -> str | None:
        m = re.match(r"(F\d{3})-", self.path.name)
        return m.group(1) if m else None


def _program_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".flow", ".yaml", ".yml"))


def flow_cases() -> list[Case]:
    out = []
    for p in sorted((GOLDEN / "flow").iterdir()):
        if p == SYNTAX or not (p.is_dir() or p.suffix == ".flow"):
            continue
        files = _program_files(p) if p.is_dir() else [p]
        out.append(Case(f"flow/{p.name}", p, p.with_name(p.name.removesuffix(".flow") + ".stderr"), files))
    return out


def image_cases() -> list[Case]:
    return [Case(f"images/{p.name}", p, p.with_name(p.name + ".stderr"), _program_files(p))
            for p in sorted((GOLDEN / "images").iterdir()) if p.is_dir()]


def workflow_cases() -> list[Case]:
    return [Case(f"workflow/{p.name}", p, p.with_suffix(".stderr"), [p.with_suffix(".expect")])
            for p in sorted((GOLDEN / "workflow").glob("*.json"))]


@dataclass
class Chunk:
    first: int  # line of syntax.flow where the chunk starts
    last: int
    text: str  # padded: the chunk's lines keep their numbers


def syntax_chunks() -> list[Chunk]:
    lines = SYNTAX.read_text(encoding="utf-8").split("\n")
    chunks, start = [], 0
    for i, line in enumerate(lines + ["---"]):
        if SEPARATOR.match(line):
            body = lines[start:i]
            # A chunk ends with its last line, not with a newline: its end of file is then on that line,
            # where a marker can name it.
            while body and not body[-1].strip():
                body.pop()
            if any(b.strip() for b in body):
                chunks.append(Chunk(start + 1, start + len(body), "\n" * start + "\n".join(body)))
            start = i + 1
    return chunks


@pytest.fixture(autouse=True)
def _stable_env(monkeypatch):
    """Paths render relative to the repository root, and no outside image folder is searched."""
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("VMFLOW_IMAGES", raising=False)


def _patch(case_id: str, monkeypatch) -> None:
    for dotted, value in PATCHES.get(case_id, {}).items():
        module, name = dotted.rsplit(".", 1)
        monkeypatch.setattr(importlib.import_module(module), name, value)


def _check_case_code(case: Case, expected: list[Key]) -> None:
    if case.code is None:
        pytest.fail(f"{case.id}: a case is named `<CODE>-<slug>`", pytrace=False)
    if case.code not in {k[3] for k in expected}:
        pytest.fail(f"{case.id}: the case has no marker for {case.code}", pytrace=False)


@pytest.mark.parametrize("case", flow_cases() + image_cases(), ids=lambda c: c.id)
def test_program(case: Case, monkeypatch) -> None:
    _patch(case.id, monkeypatch)
    expected = [k for f in case.files for k in markers_in(f)]
    _check_case_code(case, expected)
    comp = Compiler().compile_path(case.path.relative_to(ROOT))
    text = rendered(comp.diagnostics, comp.sources)
    assert_markers(comp.diagnostics, comp.sources, expected, text)
    check_snapshot(case.snapshot, text)


@pytest.mark.parametrize("case", workflow_cases(), ids=lambda c: c.id)
def test_workflow(case: Case, monkeypatch) -> None:
    _patch(case.id, monkeypatch)
    expected = expect_file(case.files[0], case.path)
    _check_case_code(case, expected)
    name = rel(case.path)
    data = case.path.read_bytes()
    flow, diags = import_workflow(name, data)
    sources = SourceSet()
    sources.add(name, data.decode("utf-8", errors="replace"))
    text = rendered(diags, sources)
    assert_markers(diags, sources, expected, text)
    check_snapshot(case.snapshot, text)
    # Text comes back exactly when there is no error, and it is a program the parser accepts.
    assert (flow is None) == has_errors(diags)
    if flow is not None:
        from compiler.parser import parse

        assert parse("imported.flow", flow)[1] == []


@pytest.mark.parametrize("chunk", syntax_chunks(), ids=lambda c: f"syntax.flow:{c.first}")
def test_syntax_chunk(chunk: Chunk) -> None:
    expected = markers_in(SYNTAX, chunk.first, chunk.last)
    assert expected, f"the chunk at line {chunk.first} has no marker"
    comp = _compile_chunk(chunk)
    assert_markers(comp.diagnostics, comp.sources, expected, rendered(comp.diagnostics, comp.sources))


def _compile_chunk(chunk: Chunk):
    name = rel(SYNTAX)
    return Compiler().compile_files({name: chunk.text.encode("utf-8")}, SYNTAX.parent, SYNTAX.parent)


def test_syntax_snapshot() -> None:
    parts = []
    for chunk in syntax_chunks():
        comp = _compile_chunk(chunk)
        parts.append(rendered(comp.diagnostics, comp.sources))
    check_snapshot(SYNTAX.with_suffix(".stderr"), "\n".join(parts))


def test_no_orphan_snapshots() -> None:
    """Every snapshot belongs to a case; a renamed case leaves none behind (bless removes them)."""
    cases = flow_cases() + image_cases() + workflow_cases()
    wanted = {c.snapshot for c in cases} | {SYNTAX.with_suffix(".stderr")}
    orphans = sorted(p for d in ("flow", "images", "workflow") for p in (GOLDEN / d).glob("*.stderr")
                     if p not in wanted)
    lonely = sorted(rel(p) for p in (GOLDEN / "workflow").glob("*.expect") if not p.with_suffix(".json").exists())
    assert not lonely, f".expect files without their .json case: {lonely}"
    if BLESS:
        for p in orphans:
            p.unlink()
        return
    assert not orphans, f"snapshots without a case: {[rel(p) for p in orphans]}"


# ------------------------------------------------------------------------------------------ coverage


def codes_in_compiler() -> set[str]:
    """Every code the compiler can emit: each one is passed to `error`/`warning` as a string literal."""
    return {code for p in (ROOT / "compiler").glob("*.py")
            for code in CODE_LITERAL.findall(p.read_text(encoding="utf-8"))}


def test_every_code_has_a_golden_case() -> None:
    covered = set()
    for case in flow_cases() + image_cases():
        covered |= {k[3] for f in case.files for k in markers_in(f)}
    for case in workflow_cases():
        covered |= {k[3] for k in expect_file(case.files[0], case.path)}
    covered |= {k[3] for k in markers_in(SYNTAX)}
    missing = sorted(codes_in_compiler() - covered)
    assert not missing, f"codes with no golden case: {missing}"
    unknown = sorted(covered - codes_in_compiler())
    assert not unknown, f"golden markers name codes the compiler never emits: {unknown}"


def test_every_code_has_a_spec_page() -> None:
    spec = ROOT / "specs" / "diagnostics.md"
    assert spec.exists(), "specs/diagnostics.md does not exist"
    headings = set(SPEC_HEADING.findall(spec.read_text(encoding="utf-8")))
    missing = sorted(codes_in_compiler() - headings)
    assert not missing, f"codes without a `## Fnnn` page in specs/diagnostics.md: {missing}"


# ------------------------------------------------------------------------------------------ the CLI

CLI_DIR = GOLDEN / "cli"


def _vmflow() -> list[str]:
    script = Path(sys.executable).with_name("vmflow")
    return [str(script)] if script.exists() else [sys.executable, "-m", "controller.cli"]


# name -> arguments after `vmflow validate`; all are started at once, they take most of the suite's time.
CLI_RUNS = {
    "errors-json": ["--format", "json", "tests/golden/cli/errors.flow"],
    "errors-github": ["--format", "github", "tests/golden/cli/errors.flow"],
    "warnings": ["tests/golden/cli/warnings.flow"],
    "warnings-strict": ["--strict", "tests/golden/cli/warnings.flow"],
    "clean": ["--strict", "tests/golden/cli/clean.flow"],
}


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def cli_runs() -> dict[str, Run]:
    env = {k: v for k, v in os.environ.items() if k != "VMFLOW_IMAGES"}
    env.update(NO_COLOR="1", COLUMNS="200")
    procs = {name: subprocess.Popen([*_vmflow(), "validate", "--no-color", *args], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in CLI_RUNS.items()}
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=60)
        out[name] = Run(p.returncode, stdout, stderr)
    return out


def test_cli_json(cli_runs) -> None:
    run = cli_runs["errors-json"]
    assert run.code == 1, run.stderr
    doc = json.loads(run.stdout)
    assert doc["format_version"] == 1
    assert doc["valid"] is False
    diags = doc["diagnostics"]
    assert doc["error_count"] == sum(d["severity"] == "error" for d in diags) > 1
    assert doc["warning_count"] == sum(d["severity"] == "warning" for d in diags)
    for d in diags:
        for key in ("file", "line", "column", "end_line", "end_column", "severity", "code", "message", "help"):
            assert key in d, f"{key} missing from {d}"
        assert (d["line"], d["column"]) <= (d["end_line"], d["end_column"])
    got = collections.Counter((d["file"], d["line"], d["severity"], d["code"]) for d in diags)
    assert got == collections.Counter(markers_in(CLI_DIR / "errors.flow"))
    check_snapshot(CLI_DIR / "errors.json.stdout", run.stdout)


def test_cli_github(cli_runs) -> None:
    run = cli_runs["errors-github"]
    assert run.code == 1, run.stderr
    lines = run.stdout.splitlines()
    assert lines and all(line.startswith(("::error file=", "::warning file=")) for line in lines), run.stdout
    got = collections.Counter()
    for line in lines:
        props = dict(p.split("=", 1) for p in line.split(" ", 1)[1].split("::", 1)[0].split(","))
        got[(props["file"], int(props["line"]), line[2:].split(" ", 1)[0], props["title"])] += 1
    assert got == collections.Counter(markers_in(CLI_DIR / "errors.flow"))
    check_snapshot(CLI_DIR / "errors.github.stdout", run.stdout)


def test_cli_exit_codes(cli_runs) -> None:
    warnings, strict, clean = cli_runs["warnings"], cli_runs["warnings-strict"], cli_runs["clean"]
    assert warnings.code == 0, warnings.stdout + warnings.stderr
    assert "warning[" in warnings.stdout and "error[" not in warnings.stdout
    assert strict.code == 1, strict.stdout + strict.stderr
    assert clean.code == 0, clean.stdout + clean.stderr
    assert "no problems" in clean.stdout
