"""Diagnostics -> text, four ways: human (rustc-style frames with carets, colour optional), plain (one line
each, for CI logs), JSON (specs/diagnostics-json.md) and GitHub workflow-command annotations.

Rendering is the only place spans become lines and columns.
"""

from __future__ import annotations

import json
import os

import click

from compiler.diagnostics import Diagnostic, Severity
from compiler.source import SourceSet

JSON_FORMAT_VERSION = 1
_COLOURS = {Severity.ERROR: "red", Severity.WARNING: "yellow"}


def display_path(path: str) -> str:
    """Paths below the working folder print relative to it (as a user would type them)."""
    if os.path.isabs(path):
        rel = os.path.relpath(path)
        if not rel.startswith(".."):
            return rel
    return path


def _position(d: Diagnostic, sources: SourceSet) -> dict:
    s = d.span
    if s is None:
        return {"file": None, "line": None, "column": None, "end_line": None, "end_column": None}
    src = sources.get(s.file)
    if src is None:
        return {"file": display_path(s.file), "line": None, "column": None, "end_line": None, "end_column": None}
    line, col = src.line_col(s.start)
    end_line, end_col = src.line_col(max(s.end, s.start))
    return {"file": display_path(s.file), "line": line, "column": col, "end_line": end_line, "end_column": end_col}


def as_dict(d: Diagnostic, sources: SourceSet) -> dict:
    out = _position(d, sources)
    out.update(severity=d.severity.value, code=d.code, message=d.message, help=d.help)
    out["labels"] = []
    for lab in d.labels:
        p = _position(type(d)(d.severity, d.code, "", lab.span), sources)
        out["labels"].append({"file": p["file"], "line": p["line"], "column": p["column"],
                              "end_line": p["end_line"], "end_column": p["end_column"], "message": lab.message})
    return out


def render_json(diags: list[Diagnostic], sources: SourceSet, strict: bool = False) -> str:
    errors = sum(d.severity is Severity.ERROR for d in diags)
    doc = {"format_version": JSON_FORMAT_VERSION, "valid": errors == 0 and not (strict and diags), "error_count": errors,
           "warning_count": len(diags) - errors, "diagnostics": [as_dict(d, sources) for d in diags]}
    return json.dumps(doc, indent=2) + "\n"


def _gh_escape(s: str, prop: bool = False) -> str:
    s = s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if prop:
        s = s.replace(":", "%3A").replace(",", "%2C")
    return s


def render_github(diags: list[Diagnostic], sources: SourceSet) -> str:
    out = []
    for d in diags:
        p = _position(d, sources)
        kind = "error" if d.severity is Severity.ERROR else "warning"
        props = [f"title={_gh_escape(d.code, True)}"]
        if p["file"]:
            props.insert(0, f"file={_gh_escape(p['file'], True)}")
        if p["line"]:
            props += [f"line={p['line']}", f"col={p['column']}", f"endLine={p['end_line']}",
                      f"endColumn={p['end_column']}"]
        msg = d.message + (f"\n{d.help}" if d.help else "")
        out.append(f"::{kind} {','.join(props)}::{_gh_escape(msg)}")
    return "\n".join(out) + ("\n" if out else "")


def render_plain(diags: list[Diagnostic], sources: SourceSet) -> str:
    out = []
    for d in diags:
        p = _position(d, sources)
        where = f"{p['file']}:{p['line']}:{p['column']}: " if p["line"] else (f"{p['file']}: " if p["file"] else "")
        out.append(f"{where}{d.severity.value}[{d.code}]: {d.message}")
        if d.help:
            out.append(f"    help: {d.help}")
    return "\n".join(out) + ("\n" if out else "")


def _frame(lines: list[str], sources: SourceSet, span, label: str | None, style, gutter: int, mark: str,
           after=None) -> None:
    """Append the source line of `span` and a caret line under it. When `after` (the previous frame's
    span) is on the same line, only the caret line is added, as rustc does."""
    src = sources.get(span.file)
    if src is None:
        return
    line, col = src.line_col(span.start)
    end_line, end_col = src.line_col(max(span.end, span.start))
    text = src.line_text(line).expandtabs(1)
    if len(text) > 200:  # a minified or generated line: show the part around the span
        cut = max(0, col - 60)
        text, col, end_col = "…" + text[cut:cut + 160] + "…", col - cut + 1, min(end_col - cut + 1, 162)
    width = (end_col - col) if end_line == line and end_col > col else 1
    bar = style("|", "blue")
    if after is None or after.file != span.file or src.line_col(after.start)[0] != line:
        lines.append(f"{style(str(line).rjust(gutter), 'blue')} {bar} {text}")
    carets = style(mark * max(width, 1) + (f" {label}" if label else ""), None)
    lines.append(f"{' ' * gutter} {bar} {' ' * (col - 1)}{carets}")


def render_human(diags: list[Diagnostic], sources: SourceSet, colour: bool = False) -> str:
    def style(s: str, fg: str | None, bold: bool = False) -> str:
        return click.style(s, fg=fg, bold=bold) if colour and (fg or bold) else s

    out: list[str] = []
    for d in diags:
        p = _position(d, sources)
        sev = style(f"{d.severity.value}[{d.code}]", _COLOURS[d.severity], bold=True)
        out.append(f"{sev}: {style(d.message, None, bold=True)}")
        gutter = max([len(str(p["line"] or 0))] + [len(str(sources[lab.span.file].line_col(lab.span.start)[0]))
                                                    for lab in d.labels if lab.span.file in sources])
        if p["file"]:
            loc = f"{p['file']}:{p['line']}:{p['column']}" if p["line"] else p["file"]
            out.append(f"{' ' * gutter}{style('-->', 'blue')} {loc}")
        if d.span is not None and d.span.file in sources:
            out.append(f"{' ' * gutter} {style('|', 'blue')}")
            caret = lambda s, fg: style(s, _COLOURS[d.severity] if fg is None else fg, bold=fg is None)  # noqa: E731
            _frame(out, sources, d.span, d.label, caret, gutter, "^")
            prev = d.span
            for lab in d.labels:
                if lab.span.file != d.span.file:
                    lp = _position(type(d)(d.severity, d.code, "", lab.span), sources)
                    out.append(f"{' ' * gutter}{style(':::', 'blue')} {lp['file']}:{lp['line']}:{lp['column']}")
                _frame(out, sources, lab.span, lab.message, lambda s, fg: style(s, fg or "blue"), gutter, "-", prev)
                prev = lab.span
        if d.help:
            out.append(f"{' ' * gutter} {style('=', 'blue')} {style('help', None, bold=True)}: {d.help}")
        out.append("")
    return "\n".join(out)


def summary(diags: list[Diagnostic]) -> str:
    errors = sum(d.severity is Severity.ERROR for d in diags)
    warnings = len(diags) - errors
    parts = []
    if errors:
        parts.append(f"{errors} error{'s' if errors != 1 else ''}")
    if warnings:
        parts.append(f"{warnings} warning{'s' if warnings != 1 else ''}")
    return ", ".join(parts) or "no problems"


def render(fmt: str, diags: list[Diagnostic], sources: SourceSet, colour: bool = False, strict: bool = False) -> str:
    if fmt == "json":
        return render_json(diags, sources, strict)
    if fmt == "github":
        return render_github(diags, sources)
    if fmt == "plain":
        return render_plain(diags, sources)
    return render_human(diags, sources, colour)
