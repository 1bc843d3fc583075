"""Source text and the map from character offsets to lines and columns.

Spans everywhere in the compiler are offsets; only rendering (compiler/render.py) asks for a line and a
column, through `Source.line_col`. A `SourceSet` holds every text a compilation read (`.flow` files, image
schemas, imported JSON) so a diagnostic can be rendered whatever file it points into.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass
class Source:
    path: str
    text: str
    _line_starts: list[int] | None = field(default=None, repr=False)

    @property
    def line_starts(self) -> list[int]:
        if self._line_starts is None:
            starts = [0]
            find = self.text.find
            i = find("\n")
            while i != -1:
                starts.append(i + 1)
                i = find("\n", i + 1)
            self._line_starts = starts
        return self._line_starts

    def line_col(self, offset: int) -> tuple[int, int]:
        """1-based line and column (in characters) of a character offset; clamped to the text."""
        offset = max(0, min(offset, len(self.text)))
        line = bisect.bisect_right(self.line_starts, offset) - 1
        return line + 1, offset - self.line_starts[line] + 1

    def line_text(self, line: int) -> str:
        starts = self.line_starts
        if line < 1 or line > len(starts):
            return ""
        end = starts[line] - 1 if line < len(starts) else len(self.text)
        return self.text[starts[line - 1] : end].rstrip("\r")

    def offset(self, line: int, column: int) -> int:
        """Inverse of `line_col`, for positions that arrive as line/column (YAML marks, JSON errors)."""
        starts = self.line_starts
        line = max(1, min(line, len(starts)))
        return min(starts[line - 1] + max(column, 1) - 1, len(self.text))


class SourceSet(dict):
    """path -> Source for every text one compilation read."""

    def add(self, path: str, text: str) -> Source:
        src = Source(path, text)
        self[path] = src
        return src
