"""The diagnostic pages of specs/diagnostics.md, looked up by code for `vmflow explain`.

The spec file is the single source: each code is a `## Fnnn: title` section.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

DIAGNOSTICS_MD = Path(__file__).resolve().parent.parent / "specs" / "diagnostics.md"
_HEADING = re.compile(r"^## (F\d{3})\b.*$", re.M)


@lru_cache(maxsize=1)
def _pages() -> dict[str, str]:
    try:
        text = DIAGNOSTICS_MD.read_text(encoding="utf-8")
    except OSError:
        return {}
    marks = list(_HEADING.finditer(text))
    pages = {}
    for m, nxt in zip(marks, marks[1:] + [None]):
        end = nxt.start() if nxt else len(text)
        pages[m.group(1)] = text[m.start():end].strip()
    return pages


def known_codes() -> list[str]:
    return sorted(_pages())


def explain_code(code: str) -> str | None:
    return _pages().get(code.strip().upper())
