"""Libvirt domain XML, both ways: desired `VmState` → XML to define, and observed XML → `VmState`.

Pure functions over strings (ElementTree), no libvirt: the adapter (controller/hypervisor.py) passes XML in
and out, and tests can feed XML as real tools write it (virt-install's graphics, channels, controllers,
cputune...). What vmflow owns is recorded in `<metadata>` under its own namespace; a domain without that
record is unmanaged.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from controller.state import (METADATA_NS, METADATA_PREFIX, DiskState, NicState, Ownership, Unmanaged,
                              VmState)

ET.register_namespace(METADATA_PREFIX, METADATA_NS)
_NS = f"{{{METADATA_NS}}}"
_UNITS_KIB = {"b": 1 / 1024, "bytes": 1 / 1024, "k": 1, "kib": 1, "kb": 1000 / 1024, "m": 1024, "mib": 1024,
              "mb": 1000**2 / 1024, "g": 1024**2, "gib": 1024**2, "gb": 1000**3 / 1024, "t": 1024**3,
              "tib": 1024**3, "tb": 1000**4 / 1024}


def _kib(el: ET.Element | None) -> int:
    if el is None or not (el.text or "").strip():
        return 0
    unit = (el.get("unit") or "KiB").lower()
    return int(int(el.text.strip()) * _UNITS_KIB.get(unit, 1))


def ownership_xml(owner: Ownership) -> ET.Element:
    rec = ET.Element(f"{_NS}owner")
    for key in ("program", "address", "revision"):
        value = getattr(owner, key)
        if value is not None:
            ET.SubElement(rec, f"{_NS}{key}").text = value
    ET.SubElement(rec, f"{_NS}base").text = json.dumps(owner.base, sort_keys=True)
    ET.SubElement(rec, f"{_NS}morphs").text = ",".join(owner.morphs)
    ET.SubElement(rec, f"{_NS}nics").text = ",".join(owner.nics)
    return rec


def applied_owner(vm: VmState) -> Ownership:
    """The ownership record for a VM as it is being applied: its base is the spec being applied."""
    owner = vm.owner or Ownership("", f"vm.{vm.name}", None)
    # The base as applied: drift is measured against it, and morphs are deviations from it.
    base = dict(owner.base, image=vm.image, pool=vm.pool, disk_sizes={d.name: d.size_kib for d in vm.disks},
                **{"cpu": vm.vcpus, "cpu.bound": vm.max_vcpus, "memory": vm.memory_kib,
                   "memory.bound": vm.max_memory_kib})
    return Ownership(owner.program, owner.address, owner.revision, base, owner.morphs,
                     tuple(n.name for n in vm.nics))


def ownership_metadata(vm: VmState) -> str:
    """The record as libvirt's metadata API takes it: one element, the namespace given separately."""
    rec = ownership_xml(applied_owner(vm))
    for el in rec.iter():
        el.tag = el.tag.split("}", 1)[-1]
    return ET.tostring(rec, encoding="unicode")


def _ownership(root: ET.Element) -> Ownership | None:
    rec = root.find(f"metadata/{_NS}owner")
    if rec is None:
        return None

    def text(tag: str) -> str | None:
        el = rec.find(f"{_NS}{tag}")
        return el.text if el is not None else None

    try:
        base = json.loads(text("base") or "{}")
    except ValueError:
        base = {}
    split = lambda s: tuple(x for x in (s or "").split(",") if x)  # noqa: E731
    return Ownership(text("program") or "", text("address") or "", text("revision"), base,
                     split(text("morphs")), split(text("nics")))


def parse(xml: str, snapshots: tuple[str, ...] = (), running: bool = False) -> VmState | Unmanaged:
    """Observed domain XML → VmState (owned) or Unmanaged. Anything unknown in the XML is ignored."""
    root = ET.fromstring(xml)
    name = root.findtext("name", "")
    uuid = root.findtext("uuid", "")
    owner = _ownership(root)
    if owner is None:
        return Unmanaged(name, uuid, running)
    vcpu = root.find("vcpu")
    max_vcpus = int((vcpu.text or "1").strip()) if vcpu is not None else 1
    vcpus = int(vcpu.get("current", max_vcpus)) if vcpu is not None else 1
    max_mem = _kib(root.find("memory"))
    mem = _kib(root.find("currentMemory")) or max_mem
    disks, image = [], ""
    for d in root.findall("devices/disk"):
        if d.get("device", "disk") != "disk":
            continue
        serial = d.findtext("serial")
        src = d.find("source")
        source = None if src is None else (src.get("file") or src.get("volume") or src.get("dev"))
        target = d.find("target")
        drv = d.find("driver")
        if serial == "vmflow-boot":
            image = owner.base.get("image", "")
            continue
        disks.append(DiskState(serial or (target.get("dev") if target is not None else ""), 0, source,
                               target.get("dev") if target is not None else None,
                               drv.get("type") if drv is not None else None))
    nics = []
    names = list(owner.nics)
    for i, n in enumerate(root.findall("devices/interface")):
        src = n.find("source")
        model = n.find("model")
        mac = n.find("mac")
        link = n.find("link")
        nics.append(NicState(names[i] if i < len(names) else f"nic{i}",
                             src.get("network") if src is not None and n.get("type") == "network" else None,
                             src.get("bridge") if src is not None and n.get("type") == "bridge" else None,
                             model.get("type") if model is not None else "virtio",
                             mac.get("address") if mac is not None else None,
                             link is None or link.get("state", "up") == "up"))
    sizes = owner.base.get("disk_sizes", {})
    disks = [DiskState(d.name, int(sizes.get(d.name, 0)), d.source, d.target, d.fmt) for d in disks]
    return VmState(name=name, image=image or owner.base.get("image", ""), vcpus=vcpus, max_vcpus=max_vcpus,
                   memory_kib=mem, max_memory_kib=max_mem, disks=tuple(disks), nics=tuple(nics),
                   running=running, uuid=uuid, owner=owner, snapshots=snapshots,
                   pool=owner.base.get("pool"))


def render(vm: VmState, *, domain_type: str = "test", boot_disk: str | None = None,
           disk_paths: dict[str, str] | None = None, uuid: str | None = None) -> str:
    """Desired VmState → domain XML. `domain_type` is `test` on the test driver, `qemu`/`kvm` on QEMU."""
    dom = ET.Element("domain", type=domain_type)
    ET.SubElement(dom, "name").text = vm.name
    if uuid or vm.uuid:
        ET.SubElement(dom, "uuid").text = uuid or vm.uuid
    meta = ET.SubElement(dom, "metadata")
    meta.append(ownership_xml(applied_owner(vm)))
    ET.SubElement(dom, "memory", unit="KiB").text = str(vm.max_memory_kib)
    ET.SubElement(dom, "currentMemory", unit="KiB").text = str(vm.memory_kib)
    ET.SubElement(dom, "vcpu", placement="static", current=str(vm.vcpus)).text = str(vm.max_vcpus)
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64").text = "hvm"
    devices = ET.SubElement(dom, "devices")
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    if boot_disk:
        _disk(devices, boot_disk, f"vd{next(letters)}", "vmflow-boot")
    for d in vm.disks:
        _disk(devices, (disk_paths or {}).get(d.name) or d.source or f"/var/lib/vmflow/{vm.name}-{d.name}.qcow2",
              f"vd{next(letters)}", d.name)
    for n in vm.nics:
        kind = "bridge" if n.bridge else "network"
        iface = ET.SubElement(devices, "interface", type=kind)
        if n.mac:
            ET.SubElement(iface, "mac", address=n.mac)
        ET.SubElement(iface, "source", **({"bridge": n.bridge} if n.bridge else {"network": n.network or "default"}))
        ET.SubElement(iface, "model", type=n.model)
    return ET.tostring(dom, encoding="unicode")


def _disk(devices: ET.Element, path: str, target: str, serial: str) -> None:
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2")
    ET.SubElement(disk, "source", file=path)
    ET.SubElement(disk, "target", dev=target, bus="virtio")
    ET.SubElement(disk, "serial").text = serial
