"""The JSON workflow importer (compiler/workflow.py): mapping to .flow, diagnostics located in the JSON file,
the position-aware JSON reader's agreement with json.loads, and hostile input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler import ast as A
from compiler.diagnostics import Severity
from compiler.parser import parse
from compiler.source import Source
from compiler.workflow import (MAX_DEPTH, MAX_DIAGNOSTICS, JArray, JObject, Json, JsonError, import_workflow,
                               read_json, snake_case, step_name, to_python)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "image_processing" / "pipeline.json"

# The pipeline of DESIGN.md ("The JSON workflow format"), as a value.
PIPELINE = {
    "workflow_name": "ImageProcessingPipeline",
    "start_image": "image_id_123",
    "steps": [
        {"image_id": "image_id_123", "name": "ImageUpload", "output_data": ["uploaded_image_url"],
         "next_step": "image_resize"},
        {"image_id": "image_id_456", "name": "ImageResize", "input_data": ["uploaded_image_url"],
         "output_data": ["resized_image_url"], "next_step": "object_detect"},
        {"image_id": "image_id_789", "name": "ObjectDetect", "input_data": ["resized_image_url"],
         "output_data": ["detected_objects"], "next_step": "end"},
    ],
}


# ------------------------------------------------------------------------------------------ helpers


def write(tmp_path: Path, content: str | bytes | dict | list, name: str = "workflow.json") -> Path:
    path = tmp_path / name
    if isinstance(content, (dict, list)):
        content = json.dumps(content, indent=2)
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def run(path: Path):
    data = path.read_bytes()
    text, diags = import_workflow(str(path), data)
    assert all(d.span is None or d.span.file == str(path) for d in diags)
    return text, diags


def source(path: Path) -> Source:
    return Source(str(path), path.read_bytes().decode("utf-8", errors="replace"))


def where(path: Path, span: A.Span) -> tuple[int, int, str]:
    """Line, column and the text a span covers."""
    src = source(path)
    line, col = src.line_col(span.start)
    return line, col, src.text[span.start : span.end]


def codes(diags) -> list[str]:
    return [d.code for d in diags]


def only(diags, code: str):
    found = [d for d in diags if d.code == code]
    assert len(found) == 1, diags
    return found[0]


def chain_of(text: str) -> A.Chain:
    tree, diags = parse("imported.flow", text)
    assert diags == [] and tree is not None, diags
    (chain,) = tree.items
    assert isinstance(chain, A.Chain)
    return chain


def steps_of(chain: A.Chain) -> dict[str, A.Step]:
    return {s.name.value: s for s in chain.items if isinstance(s, A.Step)}


def io_of(step: A.Step, direction: str) -> list[str]:
    return [n.value for item in step.items if isinstance(item, A.Io) and item.direction == direction
            for n in item.names]


def edges_of(chain: A.Chain) -> list[list[str]]:
    return [[n.value for n in e.path] for e in chain.items if isinstance(e, A.Edge)]


# ------------------------------------------------------------------------------------------ the example


def test_example_file_is_the_design_pipeline():
    assert json.loads(EXAMPLE.read_bytes()) == PIPELINE


def test_design_pipeline_imports_to_three_steps_and_one_edge(tmp_path):
    path = tmp_path / "pipeline.json"
    shutil.copy(EXAMPLE, path)
    text, diags = run(path)
    assert diags == []
    assert text.splitlines()[0] == "# imported from pipeline.json"
    assert str(tmp_path) not in text
    chain = chain_of(text)
    assert chain.name.value == "image_processing_pipeline"
    steps = steps_of(chain)
    assert list(steps) == ["image_upload", "image_resize", "object_detect"]
    assert {n: s.image.value for n, s in steps.items()} == {
        "image_upload": "image_id_123", "image_resize": "image_id_456", "object_detect": "image_id_789"}
    assert io_of(steps["image_upload"], "in") == []
    assert io_of(steps["image_upload"], "out") == ["uploaded_image_url"]
    assert io_of(steps["image_resize"], "in") == ["uploaded_image_url"]
    assert io_of(steps["image_resize"], "out") == ["resized_image_url"]
    assert io_of(steps["object_detect"], "in") == ["resized_image_url"]
    assert io_of(steps["object_detect"], "out") == ["detected_objects"]
    assert edges_of(chain) == [["image_upload", "image_resize", "object_detect"]]
    edge_lines = [line.strip() for line in text.splitlines() if "->" in line]
    assert edge_lines == ["image_upload -> image_resize -> object_detect"]


def test_output_shape_is_exact(tmp_path):
    text, diags = run(write(tmp_path, PIPELINE, "pipeline.json"))
    assert diags == []
    assert text == """\
# imported from pipeline.json

chain image_processing_pipeline {
  step image_upload = image_id_123 {
    out uploaded_image_url
  }
  step image_resize = image_id_456 {
    in uploaded_image_url
    out resized_image_url
  }
  step object_detect = image_id_789 {
    in resized_image_url
    out detected_objects
  }

  image_upload -> image_resize -> object_detect
}
"""


def test_several_inputs_and_no_io(tmp_path):
    wf = {"workflow_name": "Merge", "start_image": "a", "steps": [
        {"image_id": "a", "name": "Fetch", "next_step": "Join"},
        {"image_id": "b", "name": "Join", "input_data": ["left", "right"], "output_data": ["both", "log"]}]}
    text, diags = run(write(tmp_path, wf))
    assert diags == []
    steps = steps_of(chain_of(text))
    assert steps["fetch"].items == ()
    assert io_of(steps["join"], "in") == ["left", "right"]
    assert io_of(steps["join"], "out") == ["both", "log"]
    assert "    in left, right\n" in text


@pytest.mark.parametrize("next_step", ["image_resize", "ImageResize", "image-resize", "IMAGE_RESIZE",
                                       "imageResize", "Image Resize"])
def test_next_step_resolves_tolerantly(tmp_path, next_step):
    wf = json.loads(json.dumps(PIPELINE))
    wf["steps"][0]["next_step"] = next_step
    text, diags = run(write(tmp_path, wf))
    assert diags == []
    assert edges_of(chain_of(text)) == [["image_upload", "image_resize", "object_detect"]]


@pytest.mark.parametrize("end", [{"next_step": "end"}, {"next_step": "END"}, {"next_step": None}, {}])
def test_end_null_or_missing_next_step_ends_the_path(tmp_path, end):
    wf = json.loads(json.dumps(PIPELINE))
    del wf["steps"][2]["next_step"]
    wf["steps"][2].update(end)
    text, diags = run(write(tmp_path, wf))
    assert diags == []
    assert edges_of(chain_of(text)) == [["image_upload", "image_resize", "object_detect"]]


def test_single_step_has_no_edge(tmp_path):
    wf = {"workflow_name": "Solo", "start_image": "a", "steps": [{"image_id": "a", "name": "Only"}]}
    text, diags = run(write(tmp_path, wf))
    assert diags == []
    chain = chain_of(text)
    assert list(steps_of(chain)) == ["only"] and edges_of(chain) == []


def test_branches_become_one_line_per_path(tmp_path):
    wf = {"workflow_name": "Fan", "start_image": "i0", "steps": [
        {"image_id": "i0", "name": "A", "next_step": ["B", "C"]},
        {"image_id": "i1", "name": "B", "next_step": "D"},
        {"image_id": "i2", "name": "C", "next_step": "D"},
        {"image_id": "i3", "name": "D", "next_step": "end"}]}
    text, diags = run(write(tmp_path, wf))
    assert diags == []
    assert edges_of(chain_of(text)) == [["a", "b", "d"], ["a", "c", "d"]]


def test_a_loop_is_written_once_and_ends(tmp_path):
    wf = {"workflow_name": "Loop", "start_image": "i0", "steps": [
        {"image_id": "i0", "name": "A", "next_step": "b"},
        {"image_id": "i1", "name": "B", "next_step": "a"}]}
    text, diags = run(write(tmp_path, wf))
    assert diags == []
    assert edges_of(chain_of(text)) == [["a", "b", "a"]]


def test_start_step_need_not_be_first(tmp_path):
    wf = {"workflow_name": "Backwards", "start_image": "i1", "steps": [
        {"image_id": "i0", "name": "Last"},
        {"image_id": "i1", "name": "First", "next_step": "last"}]}
    text, diags = run(write(tmp_path, wf))
    assert diags == []
    chain = chain_of(text)
    assert list(steps_of(chain)) == ["first", "last"]  # the start step first: a .flow chain starts there
    assert edges_of(chain) == [["first", "last"]]


# ------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize("name, expected", [
    ("ImageProcessingPipeline", "image_processing_pipeline"),
    ("ImageUpload", "image_upload"),
    ("HTTPServer", "http_server"),
    ("ETL2Load", "etl2_load"),
    ("image resize", "image_resize"),
    ("image-resize", "image_resize"),
    ("already_snake", "already_snake"),
    ("Größe", "grosse"),
    ("Straße", "strasse"),
    ("  Trim  me ", "trim_me"),
])
def test_snake_case(name, expected):
    assert snake_case(name) == expected


@pytest.mark.parametrize("name, expected", [
    ("3DRender", "step_3_d_render"),
    ("42", "step_42"),
    ("Step", "step_step"),  # `step` would start a step declaration at the head of an edge line
    ("When", "step_when"),
    ("In", "step_in"),
    ("日本", "step_2"),  # nothing left in ASCII: named by its place
    ("Upload", "upload"),
])
def test_step_names_are_always_valid(tmp_path, name, expected):
    assert step_name(name, 2) == expected
    wf = {"workflow_name": "7Names", "start_image": "a", "steps": [
        {"image_id": "a", "name": "First", "next_step": expected},
        {"image_id": "b", "name": name, "input_data": ["in", "out"], "output_data": ["step"]}]}
    text, diags = run(write(tmp_path, wf))
    assert diags == []
    chain = chain_of(text)
    assert chain.name.value == "chain_7_names"
    assert list(steps_of(chain)) == ["first", expected]
    assert edges_of(chain) == [["first", expected]]


# ------------------------------------------------------------------------------------------ F501


def test_f501_invalid_json_points_at_the_error(tmp_path):
    text = '{\n  "workflow_name": "X",\n  "steps": [ 1 2 ]\n}\n'
    path = write(tmp_path, text)
    flow, diags = run(path)
    assert flow is None
    d = only(diags, "F501")
    assert d.severity is Severity.ERROR
    assert where(path, d.span) == (3, 16, "2")
    assert "expected `,` or `]`" in d.message
    with pytest.raises(json.JSONDecodeError) as e:
        json.loads(text)
    assert e.value.pos == d.span.start


@pytest.mark.parametrize("text, line, col", [
    ("", 1, 1),
    ('{"a": }', 1, 7),
    ('{"a": 1,}', 1, 9),
    ('{"a" 1}', 1, 6),
    ("[1, 2", 1, 6),
    ('["abc', 1, 2),
    ('["a\\qb"]', 1, 4),
    ('"tab\there"', 1, 5),
    ("[NaN]", 1, 2),
    ("[01]", 1, 3),
    ("{} {}", 1, 4),
    ('{\n  "é": tru\n}', 2, 8),
])
def test_f501_positions_agree_with_json(tmp_path, text, line, col):
    path = write(tmp_path, text)
    flow, diags = run(path)
    d = only(diags, "F501")
    assert flow is None
    assert where(path, d.span)[:2] == (line, col)
    if text != "[NaN]":  # json.loads takes NaN; the reader keeps to the standard
        with pytest.raises(json.JSONDecodeError) as e:
            json.loads(text)
        assert e.value.pos == d.span.start


def test_f501_not_utf8_points_at_the_byte(tmp_path):
    path = write(tmp_path, b'{\n  "workflow_name": "\xc3\xa9t\xe9"\n}')
    flow, diags = run(path)
    d = only(diags, "F501")
    assert flow is None
    assert "UTF-8" in d.message
    assert source(path).line_col(d.span.start) == (2, 23)  # characters, not bytes: `é` is one


def test_f501_deep_nesting(tmp_path):
    path = write(tmp_path, "[" * 10_000 + "]" * 10_000)
    flow, diags = run(path)
    d = only(diags, "F501")
    assert "nested" in d.message
    assert d.span.start == MAX_DEPTH  # the first bracket past the limit


def test_f501_byte_order_mark_is_skipped_and_counted(tmp_path):
    path = write(tmp_path, "\ufeff" + json.dumps(PIPELINE))
    flow, diags = run(path)
    assert diags == [] and flow is not None
    bad = json.loads(json.dumps(PIPELINE))
    bad["steps"][0]["next_step"] = "nowhere"
    path = write(tmp_path, "\ufeff" + json.dumps(bad))
    _, diags = run(path)
    assert where(path, only(diags, "F502").span)[2] == '"nowhere"'


# ------------------------------------------------------------------------------------------ F502


def test_f502_unknown_next_step(tmp_path):
    path = tmp_path / "pipeline.json"
    path.write_text(EXAMPLE.read_text().replace('"next_step": "image_resize"', '"next_step": "image_resise"'))
    flow, diags = run(path)
    assert flow is None
    d = only(diags, "F502")
    assert d.message == "unknown next step `image_resise`"
    assert where(path, d.span) == (3, 109, '"image_resise"')
    assert d.help == "did you mean `image_resize`?"
    assert codes(diags) == ["F502"]  # no cascade: reachability is not judged over a broken graph


def test_f502_every_unknown_name_is_reported(tmp_path):
    wf = json.loads(json.dumps(PIPELINE))
    wf["steps"][0]["next_step"] = "ImageResise"
    wf["steps"][1]["next_step"] = ["object_detect", "thumbnail"]
    path = write(tmp_path, wf)
    flow, diags = run(path)
    assert flow is None
    assert codes(diags) == ["F502", "F502"]
    assert [where(path, d.span)[2] for d in diags] == ['"ImageResise"', '"thumbnail"']
    assert diags[0].help == "did you mean `image_resize`?"


# ------------------------------------------------------------------------------------------ F503


def test_f503_root_must_be_an_object(tmp_path):
    path = write(tmp_path, "\n[1, 2]")
    flow, diags = run(path)
    d = only(diags, "F503")
    assert flow is None
    assert where(path, d.span) == (2, 1, "[1, 2]")


def test_f503_missing_fields_point_at_the_object(tmp_path):
    path = write(tmp_path, '{"start_image": "a",\n "steps": [\n  {"name": "A"}\n ]}')
    flow, diags = run(path)
    assert flow is None
    assert codes(diags) == ["F503", "F503"]
    whole, step = diags
    assert "`workflow_name`" in whole.message and where(path, whole.span)[:2] == (1, 1)
    assert whole.span.end == len(source(path).text)
    assert step.message == "step 1 has no `image_id`"
    assert where(path, step.span) == (3, 3, '{"name": "A"}')


def test_f503_wrong_types_everywhere_all_reported(tmp_path):
    text = """{
  "workflow_name": 12,
  "start_image": "a",
  "steps": [
    "not a step",
    {"image_id": "a", "name": ["A"], "input_data": "x", "output_data": ["ok", 3]},
    {"image_id": "bad id", "name": "B", "next_step": 7},
    {"image_id": "c", "name": "", "input_data": ["fine", "not fine"]}
  ]
}"""
    path = write(tmp_path, text)
    flow, diags = run(path)
    assert flow is None
    assert set(codes(diags)) == {"F503"}
    got = [(d.message, where(path, d.span)) for d in diags]
    assert got == [
        ("`workflow_name` must be a string, found a number", (2, 20, "12")),
        ("step 1 must be an object, found a string", (5, 5, '"not a step"')),
        ("`name` must be a string, found a list", (6, 31, '["A"]')),
        ("`input_data` must be a list of strings, found a string", (6, 52, '"x"')),
        ("an item of `output_data` must be a string, found a number", (6, 79, "3")),
        ("image id `bad id` cannot be written in .flow", (7, 18, '"bad id"')),
        ("`next_step` must be a step name, a list of step names or null, found a number", (7, 54, "7")),
        ("`name` is empty", (8, 31, '""')),
        ("data name `not fine` cannot be written in .flow", (8, 58, '"not fine"')),
    ]


def test_f503_steps_must_be_a_list(tmp_path):
    path = write(tmp_path, '{"workflow_name": "W", "start_image": "a", "steps": {"a": 1}}')
    flow, diags = run(path)
    d = only(diags, "F503")
    assert where(path, d.span)[2] == '{"a": 1}'
    assert codes(diags) == ["F503"]


def test_f503_image_id_morph_cannot_be_written(tmp_path):
    wf = {"workflow_name": "W", "start_image": "morph", "steps": [{"image_id": "morph", "name": "A"}]}
    path = write(tmp_path, wf)
    flow, diags = run(path)
    assert flow is None
    assert codes(diags) == ["F503"]  # the start image is that step's: not reported again


# ------------------------------------------------------------------------------------------ F504


def test_f504_start_image_matches_no_step(tmp_path):
    wf = json.loads(json.dumps(PIPELINE))
    wf["start_image"] = "image_id_12"
    path = write(tmp_path, wf)
    flow, diags = run(path)
    assert flow is None
    d = only(diags, "F504")
    assert where(path, d.span) == (3, 18, '"image_id_12"')
    assert d.help == "did you mean `image_id_123`?"
    assert codes(diags) == ["F504"]


def test_f504_start_image_missing(tmp_path):
    wf = json.loads(json.dumps(PIPELINE))
    del wf["start_image"]
    path = write(tmp_path, wf)
    flow, diags = run(path)
    d = only(diags, "F504")
    assert flow is None
    assert (d.span.start, d.span.end) == (0, len(source(path).text))


def test_f504_with_no_steps(tmp_path):
    path = write(tmp_path, {"workflow_name": "W", "start_image": "a", "steps": []})
    flow, diags = run(path)
    d = only(diags, "F504")
    assert d.help == "the workflow has no steps"


# ------------------------------------------------------------------------------------------ F505


def test_f505_names_that_normalize_alike(tmp_path):
    text = """{"workflow_name": "W", "start_image": "a", "steps": [
  {"image_id": "a", "name": "ImageUpload", "next_step": "end"},
  {"image_id": "b", "name": "image_upload"}
]}"""
    path = write(tmp_path, text)
    flow, diags = run(path)
    assert flow is None
    d = only(diags, "F505")
    assert where(path, d.span) == (3, 29, '"image_upload"')
    (first,) = d.labels
    assert where(path, first.span) == (2, 29, '"ImageUpload"')
    assert "first" in first.message
    assert "`ImageUpload` and `image_upload`" in d.help


# ------------------------------------------------------------------------------------------ F506


def test_f506_unreachable_step_is_a_warning_and_the_text_is_kept(tmp_path):
    wf = json.loads(json.dumps(PIPELINE))
    wf["steps"].append({"image_id": "image_id_999", "name": "Orphan", "input_data": ["detected_objects"]})
    path = write(tmp_path, wf)
    flow, diags = run(path)
    d = only(diags, "F506")
    assert d.severity is Severity.WARNING
    assert where(path, d.span)[2] == '"Orphan"'
    assert codes(diags) == ["F506"]
    chain = chain_of(flow)
    assert list(steps_of(chain)) == ["image_upload", "image_resize", "object_detect", "orphan"]
    assert edges_of(chain) == [["image_upload", "image_resize", "object_detect"]]


# ------------------------------------------------------------------------------------------ the JSON reader

_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
            | st.text())
json_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=5), max_leaves=30)


def _check_spans(text: str, node: Json) -> None:
    """Every value's span holds exactly that value's JSON."""
    assert json.loads(text[node.start : node.end]) == to_python(node.value)
    if isinstance(node.value, JArray):
        for item in node.value:
            _check_spans(text, item)
    elif isinstance(node.value, JObject):
        for key in node.value.keys():
            ks, ke = node.value.key_span(key)
            assert json.loads(text[ks:ke]) == key
            _check_spans(text, node.value.get(key))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values, st.sampled_from([None, 0, 2, "\t"]), st.booleans())
def test_reader_agrees_with_json_loads(value, indent, ensure_ascii):
    text = json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)
    node = read_json(text)
    assert to_python(node.value) == json.loads(text)
    _check_spans(text, node)


def test_reader_duplicate_keys_keep_the_last_value_as_json_does():
    text = '{"a": 1, "b": 2, "a": 3}'
    assert to_python(read_json(text).value) == json.loads(text) == {"a": 3, "b": 2}
    assert read_json(text).value.get("a").start == text.index("3")


_ALPHABET = list('{}[],:"0123456789-.eE+ \n\t\r\x0b\x00truefalsnul\\abu\x01é/\ud800😀') + [
    "true", "null", "false", "\\u00e9", "\\ud83d", "\\ude00"]


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(_ALPHABET), max_size=14).map("".join))
def test_reader_accepts_exactly_what_json_loads_accepts(text):
    try:
        expected = json.loads(text)
    except json.JSONDecodeError as e:
        with pytest.raises(JsonError) as mine:
            read_json(text)
        # json.loads calls a string that ends inside a `\u` escape an invalid escape; it is unterminated.
        if not (e.msg.startswith("Invalid \\uXXXX") and mine.value.message == "unterminated string"):
            assert mine.value.start == e.pos, (e.msg, mine.value.message)
        return
    assert to_python(read_json(text).value) == expected


def test_reader_surrogates_like_json():
    for text in ['"\\ud83d\\ude00"', '"\\ud83d"', '"\\ude00\\ud83d"', '"\\ud83dx"', '"\\ud83d\\u0041"']:
        assert to_python(read_json(text).value) == json.loads(text)


def test_reader_numbers_like_json():
    for text in ["0", "-0", "-0.0", "1e5", "1E+5", "2.5e-3", "123456789012345678901234567890", "1e999"]:
        assert to_python(read_json(text).value) == json.loads(text)
        assert type(to_python(read_json(text).value)) is type(json.loads(text))


# ------------------------------------------------------------------------------------------ hostile input


def _assert_sane(path: Path, flow, diags) -> None:
    length = len(source(path).text)
    for d in diags:
        assert d.span is not None and 0 <= d.span.start <= d.span.end <= length
    if flow is None:
        assert any(d.severity is Severity.ERROR for d in diags)
    else:
        assert all(d.severity is Severity.WARNING for d in diags)
        chain_of(flow)


@pytest.mark.parametrize("content", [
    b"\xff\xfe{\x00}\x00",
    b"\x00",
    "[" * 10_000 + "]" * 10_000,
    '{"a":' * 10_000 + "1" + "}" * 10_000,
    "[" * 10_000,
    "1" * 100_000,
    "[" + ",".join(["0"] * 2_500_000) + "]",
    '"' + "x" * 5_000_000 + '"',
    '{"workflow_name": "W", "start_image": "a", "steps": [' + ",".join(['{"image_id": "a", "name": 1}'] * 50_000)
    + "]}",
    '{"workflow_name": "W", "start_image": "a", "steps": [{"image_id": "a", "name": "A", "input_data": ['
    + ",".join(["null"] * 500_000) + "]}]}",
    "\ufeff",
    "\ufeff\ufeff{}",
], ids=["utf16", "nul", "deep-arrays", "deep-objects", "unclosed", "long-number", "5MB-array", "5MB-string",
        "many-bad-steps", "many-bad-items", "bom-only", "two-boms"])
def test_hostile_input_gives_diagnostics_only(tmp_path, content):
    path = write(tmp_path, content)
    flow, diags = run(path)
    assert flow is None and diags
    assert len(diags) <= MAX_DIAGNOSTICS + 1
    for d in diags:
        assert d.span is not None and 0 <= d.span.start <= d.span.end


def test_too_many_problems_are_counted(tmp_path):
    steps = [{"image_id": "a", "name": 1}] * 500
    path = write(tmp_path, {"workflow_name": "W", "start_image": "a", "steps": steps})
    _, diags = run(path)
    assert len(diags) == MAX_DIAGNOSTICS + 1
    assert diags[-1].message == f"{500 - MAX_DIAGNOSTICS:,} more problems are not shown"


_names = st.sampled_from(["ImageUpload", "image_upload", "Step", "3D", "", " ", "in", "morph", "a b", "Größe",
                          "日本", "end", "End", "x\ny", "B", "b"]) | st.text(max_size=6)
_images = st.sampled_from(["img_a", "img_b", "morph", "bad id", "", "ubuntu-24.04"])
_anything = json_values


def _maybe(strategy):
    return strategy | _anything


_step = st.fixed_dictionaries({}, optional={
    "image_id": _maybe(_images),
    "name": _maybe(_names),
    "input_data": _maybe(st.lists(_maybe(_names), max_size=3)),
    "output_data": _maybe(st.lists(_maybe(_names), max_size=3)),
    "next_step": _maybe(_names | st.lists(_names, max_size=3)),
})
_workflow = st.fixed_dictionaries({}, optional={
    "workflow_name": _maybe(_names),
    "start_image": _maybe(_images),
    "steps": _maybe(st.lists(_maybe(_step), max_size=5)),
}) | _anything


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(_workflow, st.sampled_from([None, 1]))
def test_any_workflow_shaped_json_gives_text_or_diagnostics(tmp_path, wf, indent):
    path = write(tmp_path, json.dumps(wf, indent=indent))
    flow, diags = run(path)
    _assert_sane(path, flow, diags)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=64))
def test_any_bytes_give_diagnostics_not_exceptions(tmp_path, data):
    path = write(tmp_path, data)
    flow, diags = run(path)
    assert flow is None and diags


@st.composite
def _well_formed(draw):
    names = draw(st.lists(st.text(max_size=10) | _names, min_size=1, max_size=6))
    images = draw(st.lists(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}(-[0-9]{1,2})?", fullmatch=True),
                           min_size=len(names), max_size=len(names)))
    data = st.lists(st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True), max_size=3)
    # Spellings that name the same step; upper case only for ASCII, where it keeps the letters it changes.
    targets = st.sampled_from(names + ["end"]).flatmap(
        lambda n: st.sampled_from([n, snake_case(n)] + ([n.upper()] if n.isascii() else [])))
    steps = [{"image_id": i, "name": n, "input_data": draw(data), "output_data": draw(data),
              "next_step": draw(targets | st.lists(targets, max_size=3) | st.none())}
             for n, i in zip(names, images)]
    return {"workflow_name": draw(_names), "start_image": draw(st.sampled_from(images)), "steps": steps}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(_well_formed())
def test_well_formed_workflows_give_text_that_parses(tmp_path, wf):
    path = write(tmp_path, wf)
    flow, diags = run(path)
    _assert_sane(path, flow, diags)
    if flow is None:
        # Blank names and names that collide are the only errors a well-formed workflow can have.
        assert {d.code for d in diags if d.severity is Severity.ERROR} <= {"F503", "F505"}
        return
    chain = chain_of(flow)
    steps = steps_of(chain)
    assert len(steps) == len(wf["steps"])
    # The start step comes first; the others keep their JSON order.
    start = next(s for s in wf["steps"] if s["image_id"] == wf["start_image"])
    ordered = [start] + [s for s in wf["steps"] if s is not start]
    for s, step in zip(ordered, steps.values()):
        assert step.image.value == s["image_id"]
        assert io_of(step, "in") == s["input_data"] and io_of(step, "out") == s["output_data"]
    assert all(name in steps for line in edges_of(chain) for name in line)
