"""The parser and the whole pipeline under hostile input: never a traceback, always located diagnostics."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler import parser
from compiler.diagnostics import Severity
from compiler.program import Compiler

EXAMPLES = sorted(Path(__file__).resolve().parent.parent.glob("examples/**/*.flow"))


def test_grammar_loads_strictly():
    """strict=True makes Lark refuse any terminal collision; production loads it without the check."""
    p = parser._Parser(strict=True)
    assert p.fast is not None or p.plain is not None


def _codes(text: str) -> list[str]:
    ast, diags = parser.parse("t.flow", text)
    assert (ast is None) == bool(diags)
    return [d.code for d in diags]


@pytest.mark.parametrize("text, code", [
    ("vm w { cpu = " + "(" * 10_000 + "1" + ")" * 10_000 + " }", "F105"),
    ("vm w { morph m when " + "not " * 10_000 + "cpu > 1 { cpu += 1 } }", "F105"),
    ("vm w { a = " + "[" * 10_000 + "]" * 10_000 + " }", "F105"),
    ("vm w " + "{" * 10_000 + "}" * 10_000, "F101"),
    ("vm w { a = " + "f(" * 2_000 + "1" + ")" * 2_000 + " }", "F105"),
    ("vm w { cpu = 1" + " and 1" * 20_000 + " }", None),  # flat, not deep: parses
    ("vm w { a = \"unterminated }", "F102"),
    ("vm w { cpu = 3", "F107"),
])
def test_deep_and_broken_input(text, code):
    codes = _codes(text)
    assert codes == ([code] if code else [])


def test_huge_numbers_are_refused_by_the_resolver(tmp_path):
    (tmp_path / "a.flow").write_text(f"vm w {{\n  image = linux-base\n  cpu = {'9' * 400}\n  memory = 1{'0' * 30}GiB\n}}\n")
    comp = Compiler().compile_path(tmp_path)
    assert {d.code for d in comp.diagnostics} == {"F208"}


def test_ten_megabyte_file(tmp_path):
    block = "vm web{} {{\n  image = linux-base\n  cpu = 1 .. 2\n  memory = 1GiB\n}}\n"
    text = "".join(block.format(i) for i in range(10 * 1024 * 1024 // len(block) + 1))
    assert len(text.encode()) >= 10 * 1024 * 1024
    (tmp_path / "big.flow").write_text(text)
    comp = Compiler().compile_path(tmp_path)
    assert comp.ok, comp.diagnostics[:3]
    assert len(comp.program.vms) > 100_000


def test_bytes_that_are_not_utf8(tmp_path):
    (tmp_path / "bad.flow").write_bytes(b"vm w {\n  image = \xff\xfe\n}\n")
    comp = Compiler().compile_path(tmp_path)
    [d] = comp.diagnostics
    assert d.code == "F104"
    assert comp.sources[d.span.file].line_col(d.span.start) == (2, 11)


_ALPHABET = st.sampled_from(list("vmpoolchainstep{}()[]=.,<>!+-#/\"\n \t0123456789%GiBMs") + ["vm", "morph", "when",
                            "and", "or", "not", "cpu", "memory", "..", "->", "running", "\x00", "é", "\ufeff"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_ALPHABET, max_size=80).map("".join))
def test_random_text_never_raises(text):
    ast, diags = parser.parse("r.flow", text)
    assert ast is not None or diags
    for d in diags:
        assert d.severity is Severity.ERROR and d.code.startswith("F1")
        assert 0 <= d.span.start <= len(text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(EXAMPLES), st.randoms(use_true_random=False), st.integers(1, 6))
def test_mutated_examples_never_raise(tmp_path_factory, path, rnd: random.Random, edits):
    """Delete, duplicate or swap random slices of a real example; the whole pipeline must only diagnose."""
    text = path.read_text()
    for _ in range(edits):
        i, j = sorted(rnd.randrange(len(text) + 1) for _ in range(2))
        op = rnd.choice(("delete", "dup", "insert"))
        if op == "delete":
            text = text[:i] + text[j:]
        elif op == "dup":
            text = text[:j] + text[i:j] + text[j:]
        else:
            text = text[:i] + rnd.choice(["}", "{", "=", "..", "vm x {", "cpu", "99999999999999999999", "\""]) + text[i:]
    d = tmp_path_factory.mktemp("m")
    (d / "m.flow").write_text(text)
    comp = Compiler().compile_path(d)
    for diag in comp.diagnostics:
        assert diag.code[0] == "F" and diag.message
