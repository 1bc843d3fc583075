"""The canonical formatter (compiler/fmt.py): golden layouts, and properties over random programs.

The properties hold for every program `strategies.programs()` generates and every file under examples/:
formatting is idempotent, keeps the syntax tree (spans aside) and keeps every comment.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from compiler import ast as A
from compiler.fmt import format_ast, format_source
from compiler.parser import parse
from strategies import conditions, expressions, names, programs

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(ROOT.glob("examples/**/*.flow"))

# Fields that record where a node was, not what it is.
_POSITIONAL = frozenset({"span", "depth"})


def shape(node: object) -> object:
    """A node as nested tuples without spans or depths: equal exactly when the trees say the same."""
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return (type(node).__name__,) + tuple(
            (f.name, shape(getattr(node, f.name))) for f in dataclasses.fields(node) if f.name not in _POSITIONAL
        )
    if isinstance(node, tuple):
        return tuple(shape(item) for item in node)
    return node


def comment_texts(file: A.FileAst) -> Counter:
    # The formatter drops trailing whitespace, which the lexer counts as part of a comment.
    return Counter(c.text.rstrip() for c in file.comments)


def fmt(text: str) -> str:
    out, diags = format_source("t.flow", text)
    assert out is not None, diags
    return out


def check_formatting(text: str) -> None:
    """Every property the formatter promises, for one source text that parses."""
    before, diags = parse("t.flow", text)
    assert before is not None, f"the input does not parse: {diags}"
    once = fmt(text)
    after, diags = parse("t.flow", once)
    assert after is not None, f"the formatted text does not parse: {diags}\n{once}"
    assert shape(after.items) == shape(before.items), f"the syntax tree changed:\n{once}"
    assert comment_texts(after) == comment_texts(before), f"comments changed:\n{once}"
    assert [c.text.rstrip() for c in after.comments] == [c.text.rstrip() for c in before.comments], \
        f"comments changed order:\n{once}"
    assert fmt(once) == once, "formatting is not idempotent"
    if once:
        assert once.endswith("\n") and not once.endswith("\n\n"), "not exactly one final newline"
    lines = once.split("\n")
    assert all(line == line.rstrip() for line in lines), "trailing whitespace"
    assert "\n\n\n" not in once, "two blank lines in a row"


# ------------------------------------------------------------------------------------------ properties


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs())
def test_formatting_keeps_the_tree_and_comments_and_is_idempotent(text):
    check_formatting(text)


@settings(max_examples=50, deadline=None)
@given(names(), expressions(), conditions())
def test_the_token_and_expression_strategies_give_text_the_parser_takes(name, value, condition):
    check_formatting(f"vm {name} {{ {name} = {value} morph m when {condition} {{}} }}")


@pytest.mark.parametrize("path", EXAMPLES, ids=[str(p.relative_to(ROOT)) for p in EXAMPLES])
def test_examples_format_canonically(path):
    check_formatting(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------ goldens

GOLDEN = {
    "blocks, alignment and blank lines": (
        """\
import   "base.flow"
pool   default{cpu=2..16 memory=4GiB..64GiB
     storage_path="/var/lib/vmflow"}


vm web {image=ubuntu-24.04 cpu=2
memory=4GiB


disk data { size=20GiB } nic lan{network="default"}
}
reserve nightly{window="22:00-06:00" cpu=8}
""",
        """\
import "base.flow"

pool default {
  cpu          = 2 .. 16
  memory       = 4GiB .. 64GiB
  storage_path = "/var/lib/vmflow"
}

vm web {
  image  = ubuntu-24.04
  cpu    = 2
  memory = 4GiB

  disk data {
    size = 20GiB
  }
  nic lan {
    network = "default"
  }
}

reserve nightly {
  window = "22:00-06:00"
  cpu    = 8
}
""",
    ),
    "every morph action, and the trailing cooldown moved inside": (
        """\
vm db { morph grow when avg(cpu,10m)>80% for 5m and not(app("pg") not running or
  maintenance) { cpu+=2 max 8 memory -= 1GiB min 2GiB memory=8GiB attach disk scratch{size=1GiB}
  detach disk old detach nic wan swap image debian-12 nic lan { network="x" } revert when cpu<20% for 30m }cooldown 10m
  morph empty when ready and[a,b,[ ]] {}
}
""",
        """\
vm db {
  morph grow when avg(cpu, 10m) > 80% for 5m and not (app("pg") not running or maintenance) {
    cpu += 2 max 8
    memory -= 1GiB min 2GiB
    memory = 8GiB
    attach disk scratch {
      size = 1GiB
    }
    detach disk old
    detach nic wan
    swap image debian-12
    nic lan {
      network = "x"
    }
    revert when cpu < 20% for 30m
    cooldown 10m
  }
  morph empty when ready and [a, b, []] {}
}
""",
    ),
    "chains, templates and use": (
        """\
chain etl { retries=3 step extract=extractor-1.2 { in source out raw,meta timeout=10m }
step grow=morph db{ cpu += 2 }
extract->grow->load when queue.depth>100 }
template worker(size=2, image) { vm self { cpu=size } pool p{} }
use worker as w1 { size=4 }
template bare() {}
""",
        """\
chain etl {
  retries = 3
  step extract = extractor-1.2 {
    in source
    out raw, meta
    timeout = 10m
  }
  step grow = morph db {
    cpu += 2
  }
  extract -> grow -> load when queue.depth > 100
}

template worker(size = 2, image) {
  vm self {
    cpu = size
  }
  pool p {}
}

use worker as w1 {
  size = 4
}

template bare() {}
""",
    ),
}


@pytest.mark.parametrize("name", list(GOLDEN))
def test_golden(name):
    source, expected = GOLDEN[name]
    assert fmt(source) == expected
    assert fmt(expected) == expected


def test_comments_stay_where_they_were_written():
    source = """\
# file header

// about web
vm web { # on the header line
  cpu = 2 # why two
  memory
    # inside an attribute
    = 4GiB
  # a note before the closing brace
}  // after the closing brace
vm # between keyword and name
  db {}
pool empty { // only a comment inside
}
pool p {
  x = 1


  # kept apart from x by one blank line
  y = 2
  morph_free = f(a, # inside a call
    b)
}
vm v { morph m when x > 1 { cpu += 1 } # after the morph's brace
  cooldown 5m # after the trailing cooldown
}
# the end
"""
    expected = """\
# file header

// about web
vm web { # on the header line
  cpu = 2 # why two
  # inside an attribute
  memory = 4GiB
  # a note before the closing brace
} // after the closing brace

# between keyword and name
vm db {}

pool empty { // only a comment inside
}

pool p {
  x = 1

  # kept apart from x by one blank line
  y = 2
  # inside a call
  morph_free = f(a, b)
}

vm v {
  morph m when x > 1 {
    cpu += 1
    # after the morph's brace
    cooldown 5m # after the trailing cooldown
  }
}
# the end
"""
    assert fmt(source) == expected
    check_formatting(source)


def test_alignment_runs_break_at_comments_blank_lines_and_blocks():
    source = """\
vm v {
  a = 1
  long_name = 2 # an end-of-line comment does not break the run
  # an own-line comment does
  bb = 3
  c = 4

  dddd = 5
  disk d { size = 1GiB }
  e = 6
}
"""
    expected = """\
vm v {
  a         = 1
  long_name = 2 # an end-of-line comment does not break the run
  # an own-line comment does
  bb = 3
  c  = 4

  dddd = 5
  disk d {
    size = 1GiB
  }
  e = 6
}
"""
    assert fmt(source) == expected


def test_expressions_keep_the_users_parentheses_and_spell_quantities_as_written():
    source = 'pool p { x = ((a)) and not(b or c) or d..e  y = [ 1.50GiB,"s\\"q" ,f( ) ]  z = 50MB/s }\n'
    expected = """\
pool p {
  x = ((a)) and not (b or c) or d .. e
  y = [1.50GiB, "s\\"q", f()]
  z = 50MB/s
}
"""
    assert fmt(source) == expected


def test_crlf_bom_and_trailing_whitespace_in_comments_are_normalised():
    source = "\ufeffpool p {  \r\n  x = 1 # note \t\r\n}\r\n\r\n\r\n"
    assert fmt(source) == "pool p {\n  x = 1 # note\n}\n"


def test_empty_and_comment_only_files():
    assert fmt("") == ""
    assert fmt(" \n\n\t") == ""
    assert fmt("# a\n\n\n// b") == "# a\n\n// b\n"


def test_a_syntax_error_gives_no_text_and_the_parser_diagnostics():
    out, diags = format_source("t.flow", "vm web { cpu = }")
    assert out is None
    assert diags and diags[0].code == "F101"


def test_format_ast_needs_the_text_the_tree_came_from():
    file, _ = parse("t.flow", "pool p { x = 1 }")
    assert format_ast(file, "pool p { x = 1 }") == "pool p {\n  x = 1\n}\n"
    with pytest.raises(ValueError):
        format_ast(file, "pool q { x = 1 }")


def test_nested_templates_are_refused_by_the_parser():
    """Templates nest one level only, so no later stage can be driven into deep recursion by them."""
    depth = 1200
    source = "".join(f"template t{i}() {{\n" for i in range(depth)) + "}\n" * depth
    text, diags = format_source("t.flow", source)
    assert text is None and [d.code for d in diags] == ["F101"]


def test_expressions_at_the_parsers_depth_limit():
    source = "pool p { x = " + "(" * 64 + "a" + ")" * 64 + " y = " + "not " * 60 + "b }"
    check_formatting(source)
