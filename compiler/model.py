"""The resolved program: what a directory of `.flow` files means, with names checked and units converted.

Built by compiler/resolve.py from the AST, read by compiler/graph.py and compiler/validate.py, and, as the
desired state, by the controller. Values are in base units (bytes, seconds, percent, counts); every spec
keeps the span of the source it came from so later stages can still point at it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Union

from compiler.ast import Span
from compiler.units import Dimension


class MorphKind(str, Enum):
    """The five seed morphs (CPU Add, Memory Resize, Disk Attach, OS Swap, Network Configuration)."""

    CPU = "cpu"
    MEMORY = "memory"
    DISK = "disk"
    IMAGE = "image"
    NETWORK = "network"


# Metrics a condition may read, with the dimension their values have.
METRICS: dict[str, Dimension] = {
    "cpu": Dimension.PERCENT,
    "memory": Dimension.PERCENT,
    "disk.read": Dimension.RATE,
    "disk.write": Dimension.RATE,
    "net.rx": Dimension.RATE,
    "net.tx": Dimension.RATE,
}


@dataclass(frozen=True, slots=True)
class Resource:
    """`base .. bound` (a single value means base == bound): start at base, morphs may grow to bound."""

    base: int
    bound: int
    span: Span


# ------------------------------------------------------------------------------------------ conditions


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    span: Span


@dataclass(frozen=True, slots=True)
class Func:
    """`avg(cpu, 10m)`, `max(...)`, `min(...)`, `p95(...)`, `forecast(cpu, 15m)` over a metric."""

    name: str
    metric: str
    window: float
    percentile: float | None
    span: Span


@dataclass(frozen=True, slots=True)
class Const:
    value: float | int | str  # a string only in chain branch conditions, compared with step data
    dim: Dimension
    span: Span


@dataclass(frozen=True, slots=True)
class DataRef:
    """A step output read by a chain branch condition (`detect -> review when confidence < 0.8`)."""

    name: str
    span: Span


@dataclass(frozen=True, slots=True)
class Cmp:
    left: Operand
    op: str
    right: Operand
    window: float | None  # seconds: the comparison must hold at every sample across it
    span: Span


@dataclass(frozen=True, slots=True)
class App:
    name: str
    running: bool
    span: Span


@dataclass(frozen=True, slots=True)
class AllOf:
    items: tuple[Condition, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class AnyOf:
    items: tuple[Condition, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Negate:
    item: Condition
    span: Span


Operand = Union[Metric, Func, Const, DataRef]
Condition = Union[Cmp, App, AllOf, AnyOf, Negate]


# ------------------------------------------------------------------------------------------ blocks


@dataclass(frozen=True, slots=True)
class PoolSpec:
    name: str
    host: str | None  # a libvirt URI; None means the embedded default
    cpu: int | None
    memory: int | None
    disk: int | None
    span: Span


@dataclass(frozen=True, slots=True)
class DiskSpec:
    name: str
    size: int
    source: str | None  # a path under the image root, when the disk starts from a file
    span: Span
    source_span: Span | None = None


@dataclass(frozen=True, slots=True)
class NicSpec:
    name: str
    network: str | None
    bridge: str | None
    model: str
    mac: str | None
    span: Span


@dataclass(frozen=True, slots=True)
class HealthSpec:
    """How apply and morphs decide a VM is healthy: `agent`, `port(80)`, `app("nginx") running`, `none`."""

    kind: str
    arg: str | int | None
    span: Span


@dataclass(frozen=True, slots=True)
class AdjustAction:
    resource: str  # "cpu" | "memory"
    op: str  # "add" | "sub" | "set"
    amount: int
    limit: int | None  # `max 8` / `min 2`: the morph stops there even if the VM's bound is further
    span: Span


@dataclass(frozen=True, slots=True)
class AttachDiskAction:
    disk: DiskSpec
    span: Span


@dataclass(frozen=True, slots=True)
class DetachAction:
    device: str  # "disk" | "nic"
    name: str
    span: Span


@dataclass(frozen=True, slots=True)
class SwapImageAction:
    image: str
    span: Span


@dataclass(frozen=True, slots=True)
class NicAction:
    nic: NicSpec
    span: Span


Action = Union[AdjustAction, AttachDiskAction, DetachAction, SwapImageAction, NicAction]


@dataclass(frozen=True, slots=True)
class MorphSpec:
    vm: str
    name: str
    kind: MorphKind
    condition: Condition
    actions: tuple[Action, ...]
    cooldown: float | None
    revert: Condition | None
    span: Span


@dataclass(frozen=True, slots=True)
class VmSpec:
    name: str
    image: str
    image_span: Span
    pool: str | None
    pool_span: Span | None
    cpu: Resource
    memory: Resource
    disks: tuple[DiskSpec, ...]
    nics: tuple[NicSpec, ...]
    health: HealthSpec | None
    morphs: tuple[MorphSpec, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Port:
    name: str
    span: Span


@dataclass(frozen=True, slots=True)
class StepSpec:
    chain: str
    name: str
    image: str | None  # None for a morph step
    vm: str | None  # the VM a morph step reshapes
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    retry: int | None
    backoff: float | None
    timeout: float | None
    on_error: str | None
    replicas: Resource | None
    scale_on: Condition | None
    actions: tuple[Action, ...]
    span: Span
    image_span: Span | None = None
    on_error_span: Span | None = None


@dataclass(frozen=True, slots=True)
class EdgeSpec:
    src: str
    dst: str
    condition: Condition | None
    span: Span
    src_span: Span | None = None
    dst_span: Span | None = None


@dataclass(frozen=True, slots=True)
class ChainSpec:
    name: str
    steps: tuple[StepSpec, ...]
    edges: tuple[EdgeSpec, ...]
    retry: int | None
    backoff: float | None
    timeout: float | None
    on_error: str | None
    on_error_span: Span | None
    span: Span


@dataclass(frozen=True, slots=True)
class ReserveSpec:
    name: str  # the VM (or pool) it reserves for
    metrics: tuple[str, ...]
    ahead: float
    confidence: float
    fallback: tuple  # ("percentile", 95.0, 604800.0) | ("hold",)
    span: Span


@dataclass
class Program:
    """Every block of a program by name. Names are unique per kind (addresses are `kind.name`)."""

    pools: dict[str, PoolSpec] = field(default_factory=dict)
    vms: dict[str, VmSpec] = field(default_factory=dict)
    chains: dict[str, ChainSpec] = field(default_factory=dict)
    reserves: dict[str, ReserveSpec] = field(default_factory=dict)
