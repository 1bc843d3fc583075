"""What `plan` and `apply` share: compile the program, choose the hypervisor, open the store.

The hypervisor is, in order: `--libvirt URI`; the one host the program's pools name; or the embedded
default (libvirt's test driver persisted in the state directory, see controller/embedded.py). A pool host of
`test:///default` also means the embedded default, since that URI's state would vanish with the process.

Image files (boot disks, kernels) are looked up under the image root: `--image-root DIR`, else
`VMFLOW_IMAGE_ROOT`, else `<state-dir>/images` (controller/images_repo.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from compiler.program import Compilation, Compiler
from controller import embedded
from controller.hypervisor import Hypervisor
from controller.images_repo import ImageRepo, default_root
from controller.plan import Options, Plan, plan
from controller.state import (
    ActualState,
    DiskState,
    NicState,
    Ownership,
    Unmanaged,
    VmState,
    desired_state,
)
from controller.store import Store


class ContextError(Exception):
    pass


@dataclass
class Target:
    program_dir: Path
    program: str
    compilation: Compilation
    uri: str
    state_dir: Path
    desired: dict[str, VmState]
    image_root: Path | None = None
    health: dict[str, tuple[str, object]] = dataclasses.field(default_factory=dict)  # vm -> (kind, arg)

    @property
    def embedded(self) -> bool:
        return embedded.is_embedded(self.uri)


def load(path: Path, libvirt_uri: str | None, state_dir: Path | None, images=(),
         image_root: Path | None = None) -> Target:
    comp = Compiler(images=list(images)).compile_path(path)
    program_dir = path.resolve() if path.is_dir() else path.resolve().parent
    sdir = (state_dir or program_dir / ".vmflow").resolve()
    return target(comp, program_dir.name, program_dir, libvirt_uri, sdir, image_root)


def target(comp: Compilation, name: str, program_dir: Path, libvirt_uri: str | None, state_dir: Path,
           image_root: Path | None = None) -> Target:
    """A compiled program, named `name` (the owner recorded on its VMs), bound to its hypervisor."""
    if not comp.ok:
        return Target(program_dir, name, comp, "", state_dir, {})
    hosts = sorted({p.host for p in comp.program.pools.values() if p.host and p.host != "test:///default"})
    if libvirt_uri:
        uri = libvirt_uri
    elif len(hosts) > 1:
        raise ContextError(f"the program's pools name {len(hosts)} hosts ({', '.join(hosts)}); plan and apply "
                           "work on one host at a time here: pass --libvirt URI to choose one")
    elif hosts:
        uri = hosts[0]
    else:
        uri = embedded.uri(state_dir)
    if uri == "test:///default":
        uri = embedded.uri(state_dir)
    desired = {vm.name: desired_state(vm, name) for vm in comp.program.vms.values()}
    health = {vm.name: (vm.health.kind, vm.health.arg) for vm in comp.program.vms.values() if vm.health}
    return Target(program_dir, name, comp, uri, state_dir, desired, default_root(state_dir, image_root), health)


def image_repo(t: Target, hv: Hypervisor) -> ImageRepo:
    """The image repository for this target; strict on real hypervisors, where a missing file is fatal."""
    return ImageRepo(t.image_root or default_root(t.state_dir), t.state_dir, t.compilation.catalog,
                     strict=hv.domain_type != "test")


def image_notes(t: Target, hv: Hypervisor) -> list[str]:
    """What plan and apply say about image files they cannot find (disks that will not be created)."""
    return image_repo(t, hv).missing(v.image for v in t.desired.values())


def options(t: Target, hv: Hypervisor, prune: bool, allow_mass_delete: bool) -> Options:
    pools = {p.name: (p.cpu, p.memory // 1024 if p.memory else None) for p in t.compilation.program.pools.values()}
    return Options(prune=prune, allow_mass_delete=allow_mass_delete,
                   device_hotplug=hv.capabilities.device_hotplug, cpu_unplug=hv.capabilities.cpu_unplug, pools=pools)


def owned(actual: ActualState, program: str) -> ActualState:
    """Only the VMs this program owns: another program's VMs are as untouchable as unmanaged ones."""
    mine = {n: v for n, v in actual.vms.items() if v.owner and v.owner.program == program}
    others = tuple(Unmanaged(n, v.uuid or "", v.running, v.owner.program if v.owner else None)
                   for n, v in sorted(actual.vms.items()) if n not in mine)
    return ActualState(mine, actual.unmanaged + others, actual.uri)


def make_plan(t: Target, hv: Hypervisor, prune: bool = False, allow_mass_delete: bool = False
              ) -> tuple[Plan, ActualState]:
    actual = hv.observe(snapshots=False)
    return plan(t.desired, owned(actual, t.program), options(t, hv, prune, allow_mass_delete)), actual


def open_store(t: Target) -> Store:
    return Store(t.state_dir / "vmflow.db")


def vm_to_json(vm: VmState) -> dict:
    return dataclasses.asdict(vm)


def vm_from_json(d: dict) -> VmState:
    d = dict(d)
    d["disks"] = tuple(DiskState(**x) for x in d.get("disks", ()))
    d["nics"] = tuple(NicState(**x) for x in d.get("nics", ()))
    if d.get("owner"):
        o = dict(d["owner"])
        o["morphs"] = tuple(o.get("morphs", ()))
        o["nics"] = tuple(o.get("nics", ()))
        d["owner"] = Ownership(**o)
    d["snapshots"] = tuple(d.get("snapshots", ()))
    return VmState(**d)
