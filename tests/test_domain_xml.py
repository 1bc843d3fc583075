"""Domain XML both ways: XML as real tools write it parses without error, and vmflow's own XML round-trips."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from compiler.program import Compiler
from controller import domain_xml
from controller.morph import apply_morph, revert_morph
from controller.plan import Action, Reason, plan
from controller.state import ActualState, DiskState, NicState, Ownership, Unmanaged, VmState, desired_state

# What `virt-install` and libvirt's live XML look like: graphics, channels, controllers, cputune, several
# disks, a CD-ROM, several NICs, security labels, aliases and PCI addresses.
DEVICES = """
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/var/lib/libvirt/images/db.qcow2' index='3'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <serial>{boot_serial}</serial>
      <alias name='virtio-disk0'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='native'/>
      <source dev='/dev/vg0/db-data'/>
      <target dev='vdb' bus='virtio'/>
      <serial>data</serial>
    </disk>
    <disk type='volume' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source pool='default' volume='db-logs.qcow2'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/libvirt/boot/debian-12.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <controller type='usb' index='0' model='qemu-xhci' ports='15'/>
    <controller type='pci' index='0' model='pcie-root'/>
    <controller type='pci' index='1' model='pcie-root-port'>
      <model name='pcie-root-port'/>
      <target chassis='1' port='0x10'/>
    </controller>
    <controller type='sata' index='0'/>
    <controller type='virtio-serial' index='0'/>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:01'/>
      <source network='default' portid='8d7f' bridge='virbr0'/>
      <target dev='vnet3'/>
      <model type='virtio'/>
      <alias name='net0'/>
    </interface>
    <interface type='bridge'>
      <mac address='52:54:00:aa:bb:02'/>
      <source bridge='br0'/>
      <model type='e1000'/>
      <link state='down'/>
    </interface>
    <interface type='direct'>
      <mac address='52:54:00:aa:bb:03'/>
      <source dev='eth1' mode='bridge'/>
      <model type='virtio'/>
    </interface>
    <serial type='pty'><target type='isa-serial' port='0'><model name='isa-serial'/></target></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
    </channel>
    <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
    <input type='tablet' bus='usb'/>
    <graphics type='spice' autoport='yes'><listen type='address'/><image compression='off'/></graphics>
    <sound model='ich9'/>
    <video><model type='qxl' ram='65536' vram='65536' vgamem='16384' heads='1' primary='yes'/></video>
    <redirdev bus='usb' type='spicevmc'/>
    <memballoon model='virtio'><stats period='5'/></memballoon>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
"""

DOMAIN = """<domain type='kvm' id='7' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>db</name>
  <uuid>3e3fce45-4f53-4fa7-bb32-11f34168b82b</uuid>
  <title>Database</title>
  <description>made by virt-install</description>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
    {owner}
  </metadata>
  <memory unit='GiB'>8</memory>
  <currentMemory unit='MiB'>4096</currentMemory>
  <vcpu placement='static' current='2'>8</vcpu>
  <vcpus>
    <vcpu id='0' enabled='yes' hotpluggable='no' order='1'/>
    <vcpu id='1' enabled='yes' hotpluggable='yes' order='2'/>
  </vcpus>
  <cputune>
    <shares>2048</shares>
    <vcpupin vcpu='0' cpuset='0-1'/>
    <emulatorpin cpuset='2'/>
  </cputune>
  <resource><partition>/machine</partition></resource>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features><acpi/><apic/><vmport state='off'/></features>
  <cpu mode='host-passthrough' check='none' migratable='on'/>
  <clock offset='utc'><timer name='rtc' tickpolicy='catchup'/></clock>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <pm><suspend-to-mem enabled='no'/></pm>
  <devices>{devices}</devices>
  <seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+108</label></seclabel>
  <qemu:commandline><qemu:arg value='-no-user-config'/></qemu:commandline>
</domain>
"""

OWNER = """<vmflow:owner xmlns:vmflow="https://vmflow.dev/ns/metadata/1">
      <vmflow:program>shop</vmflow:program>
      <vmflow:address>vm.db</vmflow:address>
      <vmflow:revision>abc123</vmflow:revision>
      <vmflow:base>{"image": "debian-12", "pool": "rack1", "disk_sizes": {"data": 1048576}}</vmflow:base>
      <vmflow:morphs>cpu:grow</vmflow:morphs>
      <vmflow:nics>lan,storage,mgmt</vmflow:nics>
    </vmflow:owner>"""


def test_virt_install_domain_is_unmanaged():
    xml = DOMAIN.format(owner="", devices=DEVICES.format(boot_serial="vmflow-boot"))
    got = domain_xml.parse(xml, running=True)
    assert got == Unmanaged("db", "3e3fce45-4f53-4fa7-bb32-11f34168b82b", True)


def test_owned_domain_with_extras_parses_as_vm_state():
    xml = DOMAIN.format(owner=OWNER, devices=DEVICES.format(boot_serial="vmflow-boot"))
    vm = domain_xml.parse(xml, snapshots=("vmflow-1",), running=True)
    assert isinstance(vm, VmState)
    assert (vm.name, vm.image, vm.pool, vm.uuid) == ("db", "debian-12", "rack1",
                                                     "3e3fce45-4f53-4fa7-bb32-11f34168b82b")
    assert (vm.vcpus, vm.max_vcpus) == (2, 8)
    assert (vm.memory_kib, vm.max_memory_kib) == (4096 * 1024, 8 * 1024 * 1024)
    # The boot disk (serial vmflow-boot) is the image, not a data disk; the CD-ROM is not a disk either.
    assert [d.name for d in vm.disks] == ["data", "vdc"]
    assert vm.disks[0] == DiskState("data", 1048576, "/dev/vg0/db-data", "vdb", "raw")
    assert vm.disks[1].source == "db-logs.qcow2"
    assert [(n.name, n.network, n.bridge, n.model, n.mac, n.link_up) for n in vm.nics] == [
        ("lan", "default", None, "virtio", "52:54:00:aa:bb:01", True),
        ("storage", None, "br0", "e1000", "52:54:00:aa:bb:02", False),
        ("mgmt", None, None, "virtio", "52:54:00:aa:bb:03", True),
    ]
    assert vm.owner.morphs == ("cpu:grow",) and vm.owner.revision == "abc123"
    assert vm.snapshots == ("vmflow-1",) and vm.running


def _vm(**kw) -> VmState:
    base = {"name": "web", "image": "tiny", "vcpus": 1, "max_vcpus": 4, "memory_kib": 196608,
            "max_memory_kib": 262144, "disks": (DiskState("data", 16384, None),),
            "nics": (NicState("lan", None, "br0", "virtio"),), "owner": Ownership("prog", "vm.web", None),
            "pool": None}
    return VmState(**(base | kw))


def test_qemu_rendering_has_what_the_guest_needs():
    boot = SimpleNamespace(kernel="/img/vmlinuz", initrd="/img/initrd.gz", cmdline="console=ttyS0 vmflow.app=1")
    xml = domain_xml.render(_vm(), domain_type="qemu", boot_disk="/s/disks/web-boot.qcow2",
                            disk_paths={"data": "/s/disks/web-data.qcow2"}, boot=boot, serial_log="/s/logs/web.log")
    root = ET.fromstring(xml)
    assert root.get("type") == "qemu"
    assert root.find("os/type").get("machine") == "q35"
    assert root.find("cpu").get("mode") == "maximum"
    assert (root.find("vcpu").text, root.find("vcpu").get("current")) == ("4", "1")
    assert (root.findtext("memory"), root.findtext("currentMemory")) == ("262144", "196608")
    assert (root.findtext("os/kernel"), root.findtext("os/initrd"), root.findtext("os/cmdline")) == (
        "/img/vmlinuz", "/img/initrd.gz", "console=ttyS0 vmflow.app=1")
    disks = {d.findtext("serial"): d.find("source").get("file") for d in root.iter("disk")}
    assert disks == {"vmflow-boot": "/s/disks/web-boot.qcow2", "data": "/s/disks/web-data.qcow2"}
    assert root.find("devices/memballoon/stats").get("period") == "2"
    assert root.find("devices/channel/target").get("name") == "org.qemu.guest_agent.0"
    assert root.find("devices/serial/source").get("path") == "/s/logs/web.log"
    ports = [c for c in root.iter("controller") if c.get("model") == "pcie-root-port"]
    assert len(ports) >= 2 + 1 + 3 + 4  # disks, NIC, agent/balloon/rng, spares
    back = domain_xml.parse(xml, running=True)
    assert (back.image, back.vcpus, back.max_vcpus, [d.name for d in back.disks], [n.name for n in back.nics]) \
        == ("tiny", 1, 4, ["data"], ["lan"])


def test_update_keeps_uuid_macs_and_data_disks():
    """An OS swap edits the inactive XML: new boot disk and kernel command line, everything else kept."""
    xml = DOMAIN.format(owner=OWNER, devices=DEVICES.format(boot_serial="vmflow-boot"))
    have = domain_xml.parse(xml)
    want = VmState(name="db", image="debian-13", vcpus=2, max_vcpus=8, memory_kib=4096 * 1024,
                   max_memory_kib=8 * 1024 * 1024, disks=have.disks,
                   nics=have.nics[:2] + (NicState("extra", "default", None, "virtio"),),
                   owner=have.owner, pool="rack1")
    boot = SimpleNamespace(kernel="/img/k2", initrd=None, cmdline="quiet")
    new = domain_xml.update(xml, have, want, boot_disk="/s/disks/db-boot-2.qcow2", boot=boot)
    back = domain_xml.parse(new, running=True)
    assert back.uuid == have.uuid and back.image == "debian-13"
    assert [(n.name, n.mac) for n in back.nics][:2] == [(n.name, n.mac) for n in have.nics[:2]]
    assert [n.name for n in back.nics] == ["lan", "storage", "extra"]
    assert [d.name for d in back.disks] == ["data", "vdc"]
    root = ET.fromstring(new)
    assert domain_xml.find_disk(new, "vmflow-boot") and "db-boot-2.qcow2" in domain_xml.find_disk(new, "vmflow-boot")
    assert root.findtext("os/kernel") == "/img/k2" and root.find("os/initrd") is None
    assert root.find("devices/graphics") is not None and root.find("cputune") is not None


# ------------------------------------------------------------------------------------------ morphed VMs

MORPHS_FLOW = """
vm web {
  image  = linux-base
  cpu    = 2 .. 8
  memory = 4GiB .. 16GiB
  disk data { size = 20GiB }
  nic lan { network = "default" }
  nic wan { network = "public" }

  morph grow when cpu > 80% for 5m { cpu += 2 max 6 cooldown 10m }
  morph more when memory > 90% for 2m { memory += 8GiB cooldown 10m }
  morph scratch when disk.read > 50MB/s for 10m {
    attach disk scratch { size = 100GiB }
    detach disk data
    cooldown 1h
  }
  morph bigger when memory > 95% for 2m { swap image linux-base-large cooldown 1h }
  morph isolate when net.rx > 100MB/s for 5m {
    nic lan { network = "quarantine" }
    nic backup { bridge = "br0" }
    detach nic wan
    cooldown 30m
  }
}
"""


def _morph_spec():
    comp = Compiler().compile_files({"web.flow": MORPHS_FLOW.encode()}, Path("."), Path("."))
    assert comp.ok, [d.message for d in comp.diagnostics]
    return comp.program.vms["web"]


def _through_libvirt(vm: VmState, domain_type: str) -> VmState:
    """What observing the domain gives back after vmflow defined it: render, then parse."""
    # A real domain's interfaces have MACs: libvirt makes one for a NIC that has none.
    nics = tuple(replace(n, mac=n.mac or f"52:54:00:00:01:{i:02x}") for i, n in enumerate(vm.nics))
    xml = domain_xml.render(replace(vm, nics=nics), domain_type=domain_type,
                            boot_disk=f"/s/disks/{vm.name}-boot-{vm.image}.qcow2" if domain_type == "qemu" else None)
    back = domain_xml.parse(xml, running=True)
    assert isinstance(back, VmState)
    return back



@pytest.mark.parametrize("domain_type", ["test", "qemu"])
@pytest.mark.parametrize("morph", ["grow", "more", "scratch", "bigger", "isolate"])
def test_a_morphed_vm_round_trips_through_libvirt(morph: str, domain_type: str):
    """Every morph kind: the target, defined and observed again, is what the planner calls `morphed`; the
    revert, defined and observed again, leaves nothing to plan. The base stays the one applied, the image is
    the one booted, and a disk the morph attached keeps its size."""
    spec = _morph_spec()
    m = next(x for x in spec.morphs if x.name == morph)
    want = desired_state(spec, "prog")
    applied = _through_libvirt(want, domain_type)
    base = dict(applied.owner.base)
    assert base["cpu"] == 2 and base["image"] == "linux-base"

    fired = apply_morph(applied, spec, m)
    assert fired.changed
    seen = _through_libvirt(fired.target, domain_type)
    assert seen.owner.base == base, "a morph never moves the recorded base"
    assert seen.owner.morphs == fired.target.owner.morphs
    assert (seen.image, seen.vcpus, seen.memory_kib) == (fired.target.image, fired.target.vcpus,
                                                         fired.target.memory_kib)
    assert {d.name: d.size_kib for d in seen.disks} == {d.name: d.size_kib for d in fired.target.disks}
    assert {n.name: (n.network, n.bridge) for n in seen.nics} == \
           {n.name: (n.network, n.bridge) for n in fired.target.nics}
    p = plan({"web": want}, ActualState({"web": seen}))
    (change,) = p.changes
    assert (change.action, change.reasons) == (Action.NOOP, (Reason.MORPHED,))
    assert not p.drift

    back = revert_morph(seen, spec, m)
    assert back.changed and back.target.owner.morphs == ()
    again = _through_libvirt(back.target, domain_type)
    assert again.owner.morphs == () and again.owner.base == base
    (change,) = plan({"web": want}, ActualState({"web": again})).changes
    assert (change.action, change.reasons) == (Action.NOOP, ())


def test_a_record_without_current_reads_the_base():
    """Domains applied before the record held `current` are observed as before: the base image and sizes."""
    xml = DOMAIN.format(owner=OWNER, devices=DEVICES.format(boot_serial="vmflow-boot"))
    vm = domain_xml.parse(xml)
    assert vm.owner.current == {} and vm.image == "debian-12" and vm.disks[0].size_kib == 1048576
