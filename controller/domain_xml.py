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
    if owner.current:
        ET.SubElement(rec, f"{_NS}current").text = json.dumps(owner.current, sort_keys=True)
    return rec


def applied_owner(vm: VmState) -> Ownership:
    """The ownership record for a VM as it is being applied.

    Applying the program (no morphs in the record) writes the state being applied as the new base. Applying
    a morph's target (its record names morphs in effect) keeps the recorded base: a morph never moves it,
    which is how the planner tells a morph from a change of the program. Either way `current` records what
    libvirt cannot tell back: the image the domain boots and each data disk's size."""
    owner = vm.owner or Ownership("", f"vm.{vm.name}", None)
    sizes = {d.name: d.size_kib for d in vm.disks}
    if owner.morphs and owner.base:
        base = dict(owner.base)
    else:
        # The base as applied: drift is measured against it, and morphs are deviations from it.
        base = dict(owner.base, image=vm.image, pool=vm.pool, disk_sizes=sizes,
                    **{"cpu": vm.vcpus, "cpu.bound": vm.max_vcpus, "memory": vm.memory_kib,
                       "memory.bound": vm.max_memory_kib})
    return Ownership(owner.program, owner.address, owner.revision, base, owner.morphs,
                     tuple(n.name for n in vm.nics), {"image": vm.image, "disk_sizes": sizes})


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

    def doc(tag: str) -> dict:
        try:
            value = json.loads(text(tag) or "{}")
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    split = lambda s: tuple(x for x in (s or "").split(",") if x)  # noqa: E731
    return Ownership(text("program") or "", text("address") or "", text("revision"), doc("base"),
                     split(text("morphs")), split(text("nics")), doc("current"))


def parse(xml: str, snapshots: tuple[str, ...] = (), running: bool = False) -> VmState | Unmanaged:
    """Observed domain XML → VmState (owned) or Unmanaged. Anything unknown in the XML is ignored."""
    root = ET.fromstring(xml)
    name = root.findtext("name", "")
    uuid = root.findtext("uuid", "")
    owner = _ownership(root)
    if owner is None:
        return Unmanaged(name, uuid, running)
    # The image booted and the data disks' sizes: as recorded when last applied (a record written before
    # `current` existed has only the base).
    booted = owner.current.get("image") or owner.base.get("image", "")
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
        if serial == BOOT_SERIAL:
            image = booted
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
    sizes = {**(owner.base.get("disk_sizes") or {}), **(owner.current.get("disk_sizes") or {})}
    disks = [DiskState(d.name, int(sizes.get(d.name, 0)), d.source, d.target, d.fmt) for d in disks]
    return VmState(name=name, image=image or booted, vcpus=vcpus, max_vcpus=max_vcpus,
                   memory_kib=mem, max_memory_kib=max_mem, disks=tuple(disks), nics=tuple(nics),
                   running=running, uuid=uuid, owner=owner, snapshots=snapshots,
                   pool=owner.base.get("pool"))


def render(vm: VmState, *, domain_type: str = "test", boot_disk: str | None = None,
           disk_paths: dict[str, str] | None = None, uuid: str | None = None, boot=None,
           serial_log: str | None = None, hotplug_ports: int = 4) -> str:
    """Desired VmState → domain XML. `domain_type` is `test` on the test driver, `qemu`/`kvm` on QEMU.

    On QEMU: q35, every vCPU up to the bound defined and `vcpus` of them online, memory maximum = the bound
    and the balloon at the base, direct kernel boot when the image has `boot` (an object with `kernel`,
    `initrd`, `cmdline`), the guest-agent channel, the serial console appended to `serial_log` (a console
    socket nobody reads stalls the guest), and `hotplug_ports` spare PCIe root ports for devices added later.
    """
    dom = ET.Element("domain", type=domain_type)
    ET.SubElement(dom, "name").text = vm.name
    if uuid or vm.uuid:
        ET.SubElement(dom, "uuid").text = uuid or vm.uuid
    meta = ET.SubElement(dom, "metadata")
    meta.append(ownership_xml(applied_owner(vm)))
    ET.SubElement(dom, "memory", unit="KiB").text = str(vm.max_memory_kib)
    ET.SubElement(dom, "currentMemory", unit="KiB").text = str(vm.memory_kib)
    ET.SubElement(dom, "vcpu", placement="static", current=str(vm.vcpus)).text = str(vm.max_vcpus)
    qemu = domain_type in ("qemu", "kvm")
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", **({"machine": "q35"} if qemu else {})).text = "hvm"
    if boot is not None:
        _set_boot(os_el, boot)
    if qemu:
        features = ET.SubElement(dom, "features")
        ET.SubElement(features, "acpi")
        ET.SubElement(features, "apic")
        # TCG cannot use the host's CPU model; `maximum` gives the guest every feature QEMU can emulate.
        ET.SubElement(dom, "cpu", mode="maximum" if domain_type == "qemu" else "host-passthrough")
        ET.SubElement(dom, "clock", offset="utc")
        ET.SubElement(dom, "on_poweroff").text = "destroy"
        ET.SubElement(dom, "on_reboot").text = "restart"
        ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    if boot_disk:
        _disk(devices, boot_disk, f"vd{next(letters)}", BOOT_SERIAL)
    for d in vm.disks:
        _disk(devices, (disk_paths or {}).get(d.name) or d.source or f"/var/lib/vmflow/{vm.name}-{d.name}.qcow2",
              f"vd{next(letters)}", d.name)
    for n in vm.nics:
        devices.append(nic_element(n))
    if qemu:
        ch = ET.SubElement(devices, "channel", type="unix")
        ET.SubElement(ch, "target", type="virtio", name=AGENT_CHANNEL)
        if serial_log:
            ser = ET.SubElement(devices, "serial", type="file")
            # Appended, so restarts and snapshot reverts (a new QEMU process) keep the earlier output.
            ET.SubElement(ser, "source", path=serial_log, append="on")
            ET.SubElement(ser, "target", port="0")
        balloon = ET.SubElement(devices, "memballoon", model="virtio")
        ET.SubElement(balloon, "stats", period="2")
        rng = ET.SubElement(devices, "rng", model="virtio")
        ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
        # libvirt fills free root ports with the devices defined now before adding its own, so the spares
        # come on top of one port per PCIe device: disks, NICs, the agent's virtio-serial, balloon, rng.
        # Controllers without an index are numbered in order: pcie-root must be first, as 0.
        pcie = (1 if boot_disk else 0) + len(vm.disks) + len(vm.nics) + 3
        ET.SubElement(devices, "controller", type="pci", index="0", model="pcie-root")
        for _ in range(pcie + hotplug_ports):
            ET.SubElement(devices, "controller", type="pci", model="pcie-root-port")
        ET.SubElement(devices, "controller", type="usb", model="none")  # it would take a port for nothing
    return ET.tostring(dom, encoding="unicode")


BOOT_SERIAL = "vmflow-boot"
AGENT_CHANNEL = "org.qemu.guest_agent.0"


def _set_boot(os_el: ET.Element, boot) -> None:
    for tag in ("kernel", "initrd", "cmdline"):
        for old in os_el.findall(tag):
            os_el.remove(old)
    ET.SubElement(os_el, "kernel").text = boot.kernel
    if boot.initrd:
        ET.SubElement(os_el, "initrd").text = boot.initrd
    if boot.cmdline:
        ET.SubElement(os_el, "cmdline").text = boot.cmdline


def _disk_element(path: str, target: str, serial: str) -> ET.Element:
    disk = ET.Element("disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2")
    ET.SubElement(disk, "source", file=path)
    ET.SubElement(disk, "target", dev=target, bus="virtio")
    ET.SubElement(disk, "serial").text = serial
    return disk


def _disk(devices: ET.Element, path: str, target: str, serial: str) -> None:
    devices.append(_disk_element(path, target, serial))


def nic_element(n: NicState) -> ET.Element:
    kind = "bridge" if n.bridge else "network"
    iface = ET.Element("interface", type=kind)
    if n.mac:
        ET.SubElement(iface, "mac", address=n.mac)
    ET.SubElement(iface, "source", **({"bridge": n.bridge} if n.bridge else {"network": n.network or "default"}))
    ET.SubElement(iface, "model", type=n.model)
    return iface


# ------------------------------------------------------------------------------------------ devices


def disk_xml(path: str, target: str, serial: str) -> str:
    """One data disk's device XML, as attachDeviceFlags takes it."""
    return ET.tostring(_disk_element(path, target, serial), encoding="unicode")


def nic_xml(n: NicState) -> str:
    return ET.tostring(nic_element(n), encoding="unicode")


def free_target(xml: str) -> str:
    """The first virtio target name (vda, vdb...) no disk of the domain uses."""
    used = {t.get("dev") for t in ET.fromstring(xml).findall("devices/disk/target")}
    for c in "abcdefghijklmnopqrstuvwxyz":
        if f"vd{c}" not in used:
            return f"vd{c}"
    raise ValueError("no free virtio disk target")


def find_disk(xml: str, serial: str) -> str | None:
    """The device XML of the disk whose `<serial>` is `serial` (how vmflow names disks), or None."""
    for d in ET.fromstring(xml).findall("devices/disk"):
        if d.findtext("serial") == serial:
            return ET.tostring(d, encoding="unicode")
    return None


def find_nic(xml: str, mac: str) -> str | None:
    for n in ET.fromstring(xml).findall("devices/interface"):
        m = n.find("mac")
        if m is not None and (m.get("address") or "").lower() == mac.lower():
            return ET.tostring(n, encoding="unicode")
    return None


def nic_order(have: VmState | None, want: VmState) -> tuple[NicState, ...]:
    """Wanted NICs in device order: the ones kept stay where they are, new ones are appended (as hotplug
    appends them). The ownership record names interfaces by position, so it must follow this order."""
    wanted = {n.name: n for n in want.nics}
    kept = [wanted[n.name] for n in (have.nics if have else ()) if n.name in wanted]
    names = {n.name for n in kept}
    return tuple(kept) + tuple(n for n in want.nics if n.name not in names)


def update(xml: str, have: VmState, want: VmState, *, boot_disk: str | None = None, boot=None,
           disk_paths: dict[str, str] | None = None) -> str:
    """Edit a domain's inactive XML into `want`, keeping everything else (UUID, MACs, controllers, the data
    disks that stay, whatever other tools added): what an update with a restart defines."""
    from dataclasses import replace

    root = ET.fromstring(xml)
    root.find("memory").text = str(want.max_memory_kib)
    root.find("memory").set("unit", "KiB")
    cur = root.find("currentMemory")
    if cur is None:
        cur = ET.SubElement(root, "currentMemory")
    cur.text, cur.attrib = str(want.memory_kib), {"unit": "KiB"}
    vcpu = root.find("vcpu")
    vcpu.text = str(want.max_vcpus)
    vcpu.set("current", str(want.vcpus))
    # Per-vCPU state (`<vcpus>`) written after a hotplug would contradict the new counts.
    for el in root.findall("vcpus"):
        root.remove(el)
    if boot is not None:
        _set_boot(root.find("os"), boot)
    devices = root.find("devices")
    wanted_disks = {d.name: d for d in want.disks}
    present = set()
    for d in list(devices.findall("disk")):
        if d.get("device", "disk") != "disk":
            continue
        serial = d.findtext("serial")
        if serial == BOOT_SERIAL:
            if boot_disk:
                d.find("source").set("file", boot_disk)
            present.add(serial)
        elif serial in wanted_disks:
            present.add(serial)
        else:
            devices.remove(d)
    if boot_disk and BOOT_SERIAL not in present:
        devices.append(_disk_element(boot_disk, free_target(ET.tostring(root, encoding="unicode")), BOOT_SERIAL))
    for d in want.disks:
        if d.name not in present:
            path = (disk_paths or {}).get(d.name) or d.source or f"/var/lib/vmflow/{want.name}-{d.name}.qcow2"
            devices.append(_disk_element(path, free_target(ET.tostring(root, encoding="unicode")), d.name))
    order = nic_order(have, want)
    wanted_nics = {n.name: n for n in want.nics}
    ifaces = devices.findall("interface")
    for i, el in enumerate(ifaces):
        name = have.nics[i].name if i < len(have.nics) else None
        if name not in wanted_nics:
            devices.remove(el)
            continue
        n = wanted_nics[name]
        fresh = nic_element(replace(n, mac=None))
        for tag in ("source", "model"):
            for old in el.findall(tag):
                el.remove(old)
            el.append(fresh.find(tag))
        el.set("type", fresh.get("type"))
    have_names = {n.name for n in have.nics}
    for n in order:
        if n.name not in have_names:
            devices.append(nic_element(n))
    meta = root.find("metadata")
    if meta is None:
        meta = ET.SubElement(root, "metadata")
    for old in meta.findall(f"{_NS}owner"):
        meta.remove(old)
    meta.append(ownership_xml(applied_owner(replace(want, nics=order))))
    return ET.tostring(root, encoding="unicode")
