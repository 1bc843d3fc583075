"""Desired and actual state as symmetric, immutable snapshots keyed the same way (by VM name).

Desired comes from compiling (compiler.model.VmSpec → `VmState` via `desired_state`); actual comes from
observing libvirt (controller/hypervisor.py builds `VmState`s from domain XML). The planner
(controller/plan.py) compares the two field by field, so both sides use the same units: vCPU counts and
KiB of memory, as libvirt does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compiler import model as M

# The XML namespace of vmflow's ownership record inside each domain's <metadata>.
METADATA_NS = "https://vmflow.dev/ns/metadata/1"
METADATA_PREFIX = "vmflow"


@dataclass(frozen=True, slots=True)
class DiskState:
    name: str  # the `<serial>`: how a disk is matched across libvirt targets and guest device names
    size_kib: int
    source: str | None
    target: str | None = None  # vda, vdb... (actual only)
    fmt: str | None = None


@dataclass(frozen=True, slots=True)
class NicState:
    name: str  # kept in the ownership record: libvirt interfaces have no name of their own
    network: str | None
    bridge: str | None
    model: str
    mac: str | None = None
    link_up: bool = True


@dataclass(frozen=True, slots=True)
class Ownership:
    """vmflow's record in the domain's <metadata>: what program owns it, and from which revision."""

    program: str
    address: str
    revision: str | None
    base: dict = field(default_factory=dict, hash=False, compare=False)  # the base spec, as applied
    morphs: tuple[str, ...] = ()  # active morphs (runtime deviations the repository allows)
    nics: tuple[str, ...] = ()  # NIC names in device order
    # What the domain runs now, where libvirt cannot tell: the image booted and each data disk's size. It
    # differs from `base` only while morphs are in effect (an OS swap, a disk a morph attached).
    current: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True, slots=True)
class VmState:
    name: str
    image: str
    vcpus: int  # current
    max_vcpus: int
    memory_kib: int  # current (balloon)
    max_memory_kib: int
    disks: tuple[DiskState, ...]
    nics: tuple[NicState, ...]
    running: bool = True
    uuid: str | None = None
    owner: Ownership | None = None
    snapshots: tuple[str, ...] = ()
    pool: str | None = None


@dataclass(frozen=True, slots=True)
class Unmanaged:
    """A domain this program does not own: listed, never changed. `program` names the vmflow program that
    owns it, when another one does."""

    name: str
    uuid: str
    running: bool
    program: str | None = None


@dataclass(frozen=True)
class ActualState:
    vms: dict[str, VmState]
    unmanaged: tuple[Unmanaged, ...] = ()
    uri: str = ""


def desired_state(vm: M.VmSpec, program: str) -> VmState:
    """What a VM should look like in libvirt: base sizes now, bounds as the hypervisor maxima (so that
    morphs up to the bound can be applied live)."""
    return VmState(
        name=vm.name,
        image=vm.image,
        vcpus=vm.cpu.base,
        max_vcpus=vm.cpu.bound,
        memory_kib=vm.memory.base // 1024,
        max_memory_kib=vm.memory.bound // 1024,
        disks=tuple(DiskState(d.name, d.size // 1024, d.source) for d in vm.disks),
        nics=tuple(NicState(n.name, n.network, n.bridge, n.model, n.mac) for n in vm.nics),
        running=True,
        owner=Ownership(program, f"vm.{vm.name}", None),
        pool=vm.pool,
    )
