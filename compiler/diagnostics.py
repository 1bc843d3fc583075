"""Diagnostics are values: every stage returns what it built and the diagnostics it collected.

One shape for every stage (parse, resolve, validate, image schemas, workflow import), rendered three ways
by compiler/render.py. Codes are stable and grouped by stage (F1xx syntax, F2xx names and values, F3xx
validation, F4xx image schemas, F5xx workflow import); each has a page in specs/diagnostics.md.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from enum import Enum
from typing import Iterable

from compiler.ast import Span


class Severity(str, Enum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Label:
    """A secondary place worth showing with the main one ("first defined here")."""

    span: Span
    message: str


@dataclass(frozen=True, slots=True)
class Diagnostic:
    severity: Severity
    code: str
    message: str
    span: Span | None
    labels: tuple[Label, ...] = ()
    help: str | None = None
    label: str | None = None  # the text under the carets of the main span

    @property
    def sort_key(self) -> tuple:
        s = self.span
        return (s.file if s else "", s.start if s else -1, self.code, self.message)


def error(code: str, message: str, span: Span | None, *, label: str | None = None, help: str | None = None,
          labels: Iterable[Label] = ()) -> Diagnostic:
    return Diagnostic(Severity.ERROR, code, message, span, tuple(labels), help, label)


def warning(code: str, message: str, span: Span | None, *, label: str | None = None, help: str | None = None,
            labels: Iterable[Label] = ()) -> Diagnostic:
    return Diagnostic(Severity.WARNING, code, message, span, tuple(labels), help, label)


def has_errors(diags: Iterable[Diagnostic]) -> bool:
    return any(d.severity is Severity.ERROR for d in diags)


def sort(diags: Iterable[Diagnostic]) -> list[Diagnostic]:
    """All diagnostics at once, in file then position order, each reported once."""
    seen = set()
    out = []
    for d in sorted(diags, key=lambda d: d.sort_key):
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """rustc-style suggestion for a misspelt name, or None when nothing is close."""
    matches = difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=0.5 if len(word) <= 3 else 0.6)
    return f"did you mean `{matches[0]}`?" if matches else None
