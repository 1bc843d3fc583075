"""The forked parse (compiler/program.py `_parse_all`): a large batch of files is shared with worker
processes. Whatever path it takes (this process alone, workers, or a worker that dies and has its share
parsed here), a compilation gives the same program and the same diagnostics, in the same order.

The size threshold is lowered here so that a small program takes the forked path; `_cores` is pinned to 2
so that it does on a one-core machine too."""

from __future__ import annotations

from pathlib import Path

import pytest

from compiler import program as P
from compiler.program import Compiler

FILES = 12
VMS_PER_FILE = 25
# A few faults, spread over the files so that every process's share has some: an unknown image and a vCPU
# count over the image's bound (schema checks, which a worker makes for its own files).
BAD_IMAGE = {(1, 3), (6, 0), (11, 24)}
TOO_MANY_CPUS = {(4, 7), (9, 9)}


def write_program(root: Path) -> None:
    for f in range(FILES):
        blocks = []
        for i in range(VMS_PER_FILE):
            name = f"vm{f:02d}x{i:03d}"
            image = "no-such-image" if (f, i) in BAD_IMAGE else "linux-base"
            cpu = 64 if (f, i) in TOO_MANY_CPUS else 1 + i % 4
            blocks.append(f"vm {name} {{\n  image  = {image}\n  cpu    = {cpu}\n  memory = {512 + i}MiB\n}}\n")
        (root / f"part{f:02d}.flow").write_text("\n".join(blocks))


def outcome(root: Path):
    comp = Compiler().compile_path(root)
    diags = list(comp.diagnostics)
    vms = sorted(repr(vm) for vm in comp.program.vms.values()) if comp.program is not None else None
    return diags, vms, comp.lines


@pytest.fixture
def forked(monkeypatch):
    """Count the workers started, with the threshold lowered so that the batch is shared."""
    started = []
    real_fork = P._fork

    def fork(todo, share, catalog):
        started.append(len(share))
        return real_fork(todo, share, catalog)

    monkeypatch.setattr(P, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(P, "_cores", lambda: 2)
    monkeypatch.setattr(P, "_fork", fork)
    return started


def test_forked_parse_matches_the_sequential_one(tmp_path, monkeypatch, forked):
    write_program(tmp_path)
    with monkeypatch.context() as m:
        m.setenv("VMFLOW_NO_FORK", "1")
        alone = outcome(tmp_path)
    assert forked == []
    shared = outcome(tmp_path)
    assert len(forked) == 1 and 0 < forked[0] < FILES  # one worker, with part of the files
    assert shared == alone
    diags, _vms, lines = shared
    # Every planted fault is found, whichever process read its file.
    files = {d.span.file for d in diags if d.span is not None}
    assert len(diags) >= len(BAD_IMAGE) + len(TOO_MANY_CPUS), diags
    assert {f"part{f:02d}.flow" for f, _i in BAD_IMAGE | TOO_MANY_CPUS} <= {Path(f).name for f in files}, files
    assert lines == FILES * VMS_PER_FILE * 6


def test_a_worker_that_dies_has_its_share_parsed_here(tmp_path, monkeypatch, forked):
    write_program(tmp_path)
    with monkeypatch.context() as m:
        m.setenv("VMFLOW_NO_FORK", "1")
        alone = outcome(tmp_path)

    def broken_pack(results):  # runs in the worker, which inherited this module as patched
        raise RuntimeError("the worker fails before sending anything")

    monkeypatch.setattr(P, "_pack", broken_pack)
    received = []
    real_collect = P._collect

    def collect(child):
        received.append(real_collect(child))
        return received[-1]
    monkeypatch.setattr(P, "_collect", collect)
    assert outcome(tmp_path) == alone
    assert len(forked) == 1
    assert received == [None]  # the worker did fail: its whole share was parsed here


def test_a_valid_program_compiles_the_same_both_ways(tmp_path, monkeypatch, forked):
    for f in range(FILES):
        (tmp_path / f"part{f:02d}.flow").write_text("\n".join(
            f"vm v{f:02d}x{i:03d} {{\n  image  = linux-base\n  cpu    = 2\n  memory = 1GiB\n}}\n"
            for i in range(VMS_PER_FILE)))
    with monkeypatch.context() as m:
        m.setenv("VMFLOW_NO_FORK", "1")
        alone = outcome(tmp_path)
    shared = outcome(tmp_path)
    assert shared == alone and shared[0] == [] and len(shared[1]) == FILES * VMS_PER_FILE
    assert len(forked) == 1
