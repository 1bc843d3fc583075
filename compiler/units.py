"""Units of the language: what `4GiB`, `80%`, `5m`, `50MB/s` mean, in canonical base units.

Every quantity resolves to a `Dimension` and a value in that dimension's base unit: bytes, seconds,
bytes per second, percent, or a plain count. The resolver asks for the dimension a place needs and reports
a mismatch (F206) or an unknown unit (F207) with a suggestion.
"""

from __future__ import annotations

from enum import Enum
from functools import lru_cache


class Dimension(str, Enum):
    COUNT = "count"          # a plain number: vCPUs, retries, replicas
    BYTES = "bytes"          # memory and disk sizes
    DURATION = "duration"    # seconds
    RATE = "rate"            # bytes per second
    PERCENT = "percent"      # 0..100 (and beyond, where it makes sense)

    @property
    def example(self) -> str:
        return _EXAMPLES[self]


_EXAMPLES = {
    Dimension.COUNT: "`4`",
    Dimension.BYTES: "`4GiB`",
    Dimension.DURATION: "`5m`",
    Dimension.RATE: "`50MB/s`",
    Dimension.PERCENT: "`80%`",
}

_SIZES = {
    "B": 1,
    "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
}

# unit as written -> (dimension, factor to the base unit)
UNITS: dict[str, tuple[Dimension, float]] = {"": (Dimension.COUNT, 1), "%": (Dimension.PERCENT, 1)}
UNITS.update({u: (Dimension.BYTES, f) for u, f in _SIZES.items()})
UNITS.update({u + "/s": (Dimension.RATE, f) for u, f in _SIZES.items()})
UNITS.update({"ms": (Dimension.DURATION, 0.001), "s": (Dimension.DURATION, 1), "m": (Dimension.DURATION, 60),
              "h": (Dimension.DURATION, 3600), "d": (Dimension.DURATION, 86400)})

# Nothing in a VM's life is measured in numbers this large; past it a value is refused (F208) rather than
# carried into libvirt, where it would overflow an unsigned long.
MAX_VALUE = 2**62


def lookup(unit: str) -> tuple[Dimension, float] | None:
    return UNITS.get(unit)


def convert(number: str, unit: str) -> tuple[Dimension, float | int] | None:
    """(dimension, value in base units), or None for an unknown unit. Integers stay integers."""
    entry = UNITS.get(unit)
    if entry is None:
        return None
    dim, factor = entry
    if "." in number:
        value: float | int = float(number) * factor
        if dim is Dimension.BYTES and float(value).is_integer():
            value = int(value)
    else:
        value = int(number) * factor
        if isinstance(value, float) and value.is_integer():
            value = int(value)
    return dim, value


def parse_quantity(text: str) -> tuple[Dimension, float | int] | None:
    """`"4GiB"` -> (BYTES, 4294967296). For YAML values and CLI options; None when it is not a quantity."""
    text = text.strip()
    i = 0
    while i < len(text) and (text[i].isdigit() or text[i] == "."):
        i += 1
    number, unit = text[:i], text[i:].strip()
    if not number or number.count(".") > 1 or number.startswith(".") or number.endswith("."):
        return None
    return convert(number, unit)


def known_units(dim: Dimension | None = None) -> list[str]:
    return [u for u, (d, _) in UNITS.items() if u and (dim is None or d is dim)]


# Both are pure, and a graph or a plan formats the same few sizes and durations for thousands of VMs.
@lru_cache(maxsize=1024)
def format_bytes(n: int | float) -> str:
    """Largest binary unit that divides exactly, so `4294967296` prints as `4GiB`."""
    n = int(n)
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        f = _SIZES[unit]
        if n and n % f == 0:
            return f"{n // f}{unit}"
    return f"{n}B"


@lru_cache(maxsize=1024)
def format_duration(s: float) -> str:
    for unit, f in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s and s % f == 0:
            return f"{int(s // f)}{unit}"
    return f"{int(round(s * 1000))}ms"
