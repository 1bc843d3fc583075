"""The command line end to end: real processes, exit codes and output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_runner import vmflow

ROOT = Path(__file__).resolve().parent.parent




def test_validate_examples_exits_zero():
    r = vmflow("validate", "examples/")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout
    assert "examples/web" in r.stdout


def test_validate_reports_errors_with_location(tmp_path):
    (tmp_path / "a.flow").write_text("vm web {\n  image = linux-base\n  cpu = 2\n  memroy = 1GiB\n}\n")
    r = vmflow("validate", str(tmp_path))
    assert r.returncode == 1
    assert "error[F203]: unknown attribute `memroy` in vm `web`" in r.stdout
    assert "a.flow:4:3" in r.stdout
    assert "did you mean `memory`?" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr


def test_strict_fails_on_warnings_only(tmp_path):
    (tmp_path / "a.flow").write_text(
        "vm web {\n  image = linux-base\n  cpu = 2 .. 4\n  memory = 1GiB\n"
        "  morph m when cpu > 90% {\n    cpu += 1\n  }\n}\n")
    assert vmflow("validate", str(tmp_path)).returncode == 0
    r = vmflow("validate", "--strict", str(tmp_path))
    assert r.returncode == 1 and "warning[F320]" in r.stdout


def test_json_and_github_formats(tmp_path):
    (tmp_path / "a.flow").write_text("vm web {\n  image = linux-bse\n  cpu = 2\n  memory = 1GiB\n}\n")
    r = vmflow("validate", "--format", "json", str(tmp_path))
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    [d] = doc["diagnostics"]
    assert {k: d[k] for k in ("line", "column", "end_line", "end_column", "severity", "code")} == \
        {"line": 2, "column": 11, "end_line": 2, "end_column": 20, "severity": "error", "code": "F213"}
    assert d["help"] == "did you mean `linux-base`?"
    r = vmflow("validate", "--format", "github", str(tmp_path))
    assert r.stdout.startswith("::error file=") and ",line=2,col=11," in r.stdout


def test_empty_directory_and_missing_path(tmp_path):
    r = vmflow("validate", str(tmp_path))
    assert r.returncode == 1 and "F212" in r.stdout and "no `.flow` files" in r.stdout
    r = vmflow("validate", str(tmp_path / "nope"))
    assert r.returncode == 1 and "does not exist" in r.stdout


def test_usage_error_exit_code():
    r = vmflow("validate", "--format", "yaml")
    assert r.returncode == 64
    assert "Invalid value" in r.stderr


def test_graph_formats():
    r = vmflow("graph", "examples/web", "--format", "json")
    assert r.returncode == 0, r.stderr
    g = json.loads(r.stdout)
    ids = {n["id"] for n in g["nodes"]}
    assert {"pool.rack1", "vm.web", "morph.web.grow", "image.linux-base-large"} <= ids
    assert vmflow("graph", "examples/web", "-f", "mermaid").stdout.startswith("flowchart LR")
    assert vmflow("graph", "examples/web", "-f", "dot").stdout.startswith("digraph flow {")


def test_graph_of_invalid_program_fails(tmp_path):
    (tmp_path / "a.flow").write_text("vm {")
    r = vmflow("graph", str(tmp_path))
    assert r.returncode == 1 and "F101" in r.stderr


@pytest.mark.parametrize("code", ["F201", "f303"])
def test_explain(code):
    r = vmflow("explain", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"## {code.upper()}")


def test_explain_unknown_code():
    r = vmflow("explain", "F999")
    assert r.returncode == 1 and "no diagnostic code" in r.stderr


def test_images_listing():
    r = vmflow("images", "--role", "inference", "--format", "json")
    assert r.returncode == 0, r.stderr
    assert [i["id"] for i in json.loads(r.stdout)] == ["image_id_789"]
    r = vmflow("images")
    assert "linux-base-large" in r.stdout and "image_id_123" in r.stdout


def test_import_workflow_matches_hand_written_graph(tmp_path):
    out = tmp_path / "imported" / "pipeline.flow"
    out.parent.mkdir()
    r = vmflow("import", "workflow", "examples/image_processing/pipeline.json", "-o", str(out))
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert text.count("step ") == 3
    imported = json.loads(vmflow("graph", str(out.parent), "-f", "json").stdout)
    hand = json.loads(vmflow("graph", "examples/image_processing", "-f", "json").stdout)
    assert imported == hand
    flows = [e for e in imported["edges"] if e["kind"] == "flow"]
    assert [(e["from"].split(".")[-1], e["to"].split(".")[-1], e["data"]) for e in flows] == [
        ("image_resize", "object_detect", ["resized_image_url"]),
        ("image_upload", "image_resize", ["uploaded_image_url"]),
    ]
    r = vmflow("import", "workflow", "examples/image_processing/pipeline.json", "-o", str(out))
    assert r.returncode == 1 and "--force" in r.stderr


def test_fmt_check_and_rewrite(tmp_path):
    f = tmp_path / "a.flow"
    f.write_text("# keep me\nvm web { image = linux-base  cpu = 2 # two\n memory = 1GiB }\n")
    r = vmflow("fmt", "--check", str(tmp_path))
    assert r.returncode == 1 and "would reformat" in r.stderr
    assert vmflow("fmt", str(tmp_path)).returncode == 0
    text = f.read_text()
    assert "# keep me" in text and "# two" in text
    assert vmflow("fmt", "--check", str(tmp_path)).returncode == 0
    assert vmflow("validate", str(tmp_path)).returncode == 0


def test_fmt_check_on_examples():
    r = vmflow("fmt", "--check", "examples/")
    assert r.returncode == 0, r.stderr


def test_help_teaches():
    r = vmflow("--help")
    assert r.returncode == 0
    for cmd in ("validate", "fmt", "graph", "explain", "import", "images"):
        assert cmd in r.stdout
    assert "Examples:" in vmflow("validate", "--help").stdout
