"""Helpers for tests and benchmarks that drive the tiny real guest on ``qemu:///system``.

The guest is built by ``scripts/build-guest.sh OUTDIR`` (kernel, initramfs, qcow2 data disk)
and the daemon is brought up by ``scripts/setup-libvirt.sh``. Facts this module relies on
(measured on the project's machines, see shared HYPERVISOR.md):

* KVM does not work: guests run under TCG (``<domain type='qemu'>``, ``<cpu mode='maximum'>``).
* Direct kernel boot on q35; hot-pluggable PCIe devices need spare ``pcie-root-port``\\ s.
* The serial console goes to a file: a console socket nobody reads stalls the guest.
* Internal snapshots need every disk to be qcow2, so each domain gets its own qcow2 overlay
  of the built ``root.qcow2`` (serial ``vmflow-root``; the guest mounts it on ``/data``).
* The application inside the guest is a process named ``nginx`` (busybox httpd on port 80),
  started at boot when the kernel command line has ``vmflow.app=1`` (the default here);
  ``/sbin/appctl start|stop|status`` controls it through :func:`agent_exec`.

Only the standard library and libvirt-python are used.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import TypeVar
from xml.sax.saxutils import escape, quoteattr

import libvirt
import libvirt_qemu

URI = "qemu:///system"
#: Where tests look for the built guest when not told otherwise.
DEFAULT_GUEST_DIR = os.environ.get("VMFLOW_GUEST_DIR", "/var/lib/vmflow-guest")
#: Serial of the per-domain data disk (the guest mounts the disk with this serial on /data).
ROOT_DISK_SERIAL = "vmflow-root"
#: ``panic=-1``: reboot at once on panic instead of hanging; ``memhp_default_state``: hot-added
#: memory comes up by itself (the guest has no udev).
BASE_CMDLINE = "console=ttyS0 panic=-1 memhp_default_state=online_movable quiet"

T = TypeVar("T")


class AgentError(RuntimeError):
    """The guest agent answered with an error, or a guest-exec did not finish in time."""


# --------------------------------------------------------------------------------------------
# Domain XML
# --------------------------------------------------------------------------------------------


def disk_xml(path: str, target: str, serial: str | None = None, *, readonly: bool = False) -> str:
    """A virtio qcow2 file disk; ``serial`` is what the guest sees in /sys/block/*/serial.

    Guest device names (vda, vdb, ...) follow probe order, not the libvirt target: match
    disks inside the guest on the serial.
    """
    parts = [
        "<disk type='file' device='disk'>",
        "<driver name='qemu' type='qcow2' discard='unmap'/>",
        f"<source file={quoteattr(path)}/>",
        f"<target dev={quoteattr(target)} bus='virtio'/>",
    ]
    if serial:
        parts.append(f"<serial>{escape(serial)}</serial>")
    if readonly:
        parts.append("<readonly/>")
    parts.append("</disk>")
    return "".join(parts)


def domain_xml(
    name: str,
    kernel: str,
    initrd: str,
    disk: str | None,
    vcpus_max: int = 4,
    vcpus_current: int = 1,
    memory_max_kib: int = 256 * 1024,
    memory_kib: int | None = None,
    *,
    serial_log: str | None = None,
    disk_serial: str = ROOT_DISK_SERIAL,
    app: bool = True,
    cmdline_extra: str = "",
    hotplug_ports: int = 4,
    balloon_period_s: int = 2,
    uuid: str | None = None,
    machine: str = "q35",
    extra_devices: str = "",
    extra_pci_devices: int = 0,
) -> str:
    """Domain XML for the tiny guest: q35, direct kernel boot, TCG.

    ``vcpus_current`` of ``vcpus_max`` vCPUs are plugged at boot (the rest can be hot-added
    with ``setVcpusFlags(n, VIR_DOMAIN_AFFECT_LIVE)``); ``memory_kib`` (default: the maximum)
    is the balloon target within ``memory_max_kib``. ``disk`` must be a qcow2 file (use
    :func:`make_overlay`) for internal snapshots to be allowed. ``hotplug_ports`` spare
    pcie-root-ports are added, one per device a test may hot-plug (disk or NIC).
    ``extra_devices`` is device XML appended as is; say in ``extra_pci_devices`` how many of
    them take a PCIe slot (NICs, disks, filesystems) so the hot-plug spares stay free.
    ``serial_log`` defaults to ``/var/log/libvirt/qemu/NAME-serial.log``; it is appended to,
    so it survives restarts and snapshot reverts (which may start a new QEMU process).
    """
    if not 1 <= vcpus_current <= vcpus_max:
        raise ValueError(f"vcpus_current={vcpus_current} outside 1..{vcpus_max}")
    if memory_kib is None:
        memory_kib = memory_max_kib
    if not 0 < memory_kib <= memory_max_kib:
        raise ValueError(f"memory_kib={memory_kib} outside 1..{memory_max_kib}")
    if serial_log is None:
        serial_log = f"/var/log/libvirt/qemu/{name}-serial.log"
    cmdline = BASE_CMDLINE + (" vmflow.app=1" if app else "") + (f" {cmdline_extra}" if cmdline_extra else "")

    devices = []
    if disk:
        devices.append(disk_xml(disk, "vda", disk_serial))
    # The guest agent channel: libvirt picks the host socket path itself.
    devices.append(
        "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
    )
    devices.append(
        f"<serial type='file'><source path={quoteattr(serial_log)} append='on'/>"
        "<target port='0'/></serial>"
    )
    devices.append(
        f"<memballoon model='virtio'><stats period='{int(balloon_period_s)}'/></memballoon>"
    )
    devices.append("<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>")
    # libvirt fills free pcie-root-ports with the devices present at define time before it adds
    # more, so spares for hot-plug must be on top of one port per PCIe device defined here:
    # disk, virtio-serial (agent channel), balloon, rng, plus extra_pci_devices.
    # q35 has no hot-plug on pcie.0 itself; USB is dropped (it would take a port for nothing).
    if machine.startswith("q35"):
        pcie_devices = (1 if disk else 0) + 3 + extra_pci_devices
        # Controllers without an index are numbered in order: pcie-root must come first as 0.
        devices.append("<controller type='pci' index='0' model='pcie-root'/>")
        devices.extend(["<controller type='pci' model='pcie-root-port'/>"] * (pcie_devices + hotplug_ports))
    devices.append("<controller type='usb' model='none'/>")
    devices.append(extra_devices)

    uuid_xml = f"<uuid>{escape(uuid)}</uuid>" if uuid else ""
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  {uuid_xml}
  <memory unit='KiB'>{int(memory_max_kib)}</memory>
  <currentMemory unit='KiB'>{int(memory_kib)}</currentMemory>
  <vcpu placement='static' current='{int(vcpus_current)}'>{int(vcpus_max)}</vcpu>
  <os>
    <type arch='x86_64' machine={quoteattr(machine)}>hvm</type>
    <kernel>{escape(kernel)}</kernel>
    <initrd>{escape(initrd)}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <cpu mode='maximum'/>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    {''.join(devices)}
  </devices>
</domain>
"""


def guest_artifacts(guest_dir: str = DEFAULT_GUEST_DIR) -> tuple[str, str, str]:
    """(vmlinuz, initrd.gz, root.qcow2) paths in a build-guest.sh output dir; raises if missing."""
    guest_dir = os.path.abspath(guest_dir)  # libvirt wants absolute paths
    paths = tuple(os.path.join(guest_dir, f) for f in ("vmlinuz", "initrd.gz", "root.qcow2"))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"guest not built (run scripts/build-guest.sh {guest_dir}): {missing}")
    return paths  # type: ignore[return-value]


def make_workdir(prefix: str = "vmflow-", base: str = "/var/tmp") -> str:
    """A fresh directory the QEMU process (user libvirt-qemu) can traverse.

    ``tempfile.mkdtemp`` makes 0700 dirs: QEMU could not open images inside them.
    """
    import tempfile

    path = tempfile.mkdtemp(prefix=prefix, dir=base)
    os.chmod(path, 0o755)
    return path


def make_overlay(base: str, path: str) -> str:
    """A qcow2 overlay of ``base`` at ``path`` (cheap; internal snapshots go into the overlay)."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.abspath(base), "-F", "qcow2", path],
        check=True,
    )
    return path


def make_qcow2(path: str, size_mib: int = 16) -> str:
    """An empty qcow2 image (a hot-pluggable data disk)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, f"{int(size_mib)}M"], check=True)
    return path


def remove_domain(conn: libvirt.virConnect, name: str) -> bool:
    """Destroy (if running) and undefine ``name`` with its snapshot metadata. True if it existed."""
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return False
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError:
        pass  # already gone between the check and the call
    flags = (
        libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    )
    try:
        dom.undefineFlags(flags)
    except libvirt.libvirtError:
        # Transient domains vanish with destroy; nothing left to undefine.
        pass
    return True


# --------------------------------------------------------------------------------------------
# Guest agent
# --------------------------------------------------------------------------------------------


def agent_command(dom: libvirt.virDomain, command: str, arguments: dict | None = None, timeout: int = 10):
    """One guest-agent command; returns its ``return`` member. ``timeout`` in whole seconds."""
    msg = {"execute": command}
    if arguments is not None:
        msg["arguments"] = arguments
    reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(msg), max(1, int(timeout)), 0)
    if reply is None:
        raise AgentError(f"{command}: no reply")
    data = json.loads(reply)
    if "error" in data:
        raise AgentError(f"{command}: {data['error']}")
    return data.get("return")


def wait_agent(dom: libvirt.virDomain, timeout: float = 60.0, interval: float = 0.2) -> float:
    """Wait until the guest agent answers ``guest-ping``; returns the seconds waited.

    Before qemu-ga opens its port libvirt fails at once ("agent is not connected") or after
    the per-call timeout ("not responding"): both mean "not yet".
    """
    t0 = time.monotonic()
    last: Exception | None = None
    while True:
        try:
            agent_command(dom, "guest-ping", timeout=2)
            return time.monotonic() - t0
        except (libvirt.libvirtError, AgentError) as e:
            last = e
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"guest agent of {dom.name()} silent after {timeout:.0f} s: {last}")
        if not dom.isActive():
            raise RuntimeError(f"domain {dom.name()} stopped while waiting for its agent")
        time.sleep(interval)


def agent_exec(
    dom: libvirt.virDomain,
    argv: Sequence[str],
    timeout: float = 30.0,
    *,
    input_data: bytes | None = None,
    text: bool = True,
) -> tuple[int, str | bytes, str | bytes]:
    """Run ``argv`` in the guest through ``guest-exec``; returns (exitcode, stdout, stderr).

    ``argv[0]`` is looked up on the agent's PATH. For pipes use ``["sh", "-c", "..."]``.
    A process killed by a signal reports ``128 + signal``. Raises :class:`AgentError` when the
    process has not exited within ``timeout`` seconds.
    """
    if not argv:
        raise ValueError("empty argv")
    args: dict = {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
    if input_data is not None:
        args["input-data"] = base64.b64encode(input_data).decode("ascii")
    deadline = time.monotonic() + timeout
    pid = agent_command(dom, "guest-exec", args, timeout=max(5, min(timeout, 30)))["pid"]
    delay = 0.02
    while True:
        status = agent_command(dom, "guest-exec-status", {"pid": pid}, timeout=10)
        if status.get("exited"):
            break
        if time.monotonic() > deadline:
            raise AgentError(f"guest-exec {list(argv)!r} still running after {timeout} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.25)
    out = base64.b64decode(status.get("out-data", ""))
    err = base64.b64decode(status.get("err-data", ""))
    if "exitcode" in status:
        code = int(status["exitcode"])
    else:
        code = 128 + int(status.get("signal", 0))
    if text:
        return code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    return code, out, err


def agent_sh(dom: libvirt.virDomain, script: str, timeout: float = 30.0, check: bool = True) -> str:
    """Run a shell snippet in the guest; returns stdout. With ``check``, non-zero exit raises."""
    code, out, err = agent_exec(dom, ["sh", "-c", script], timeout)
    if check and code != 0:
        raise AgentError(f"guest `{script}` exited {code}: {err.strip() or out.strip()}")
    return out  # type: ignore[return-value]


def guest_online_cpus(dom: libvirt.virDomain) -> int:
    """Number of CPUs online inside the guest (from /proc/cpuinfo)."""
    return int(agent_sh(dom, "grep -c ^processor /proc/cpuinfo").strip())


def guest_memtotal_kib(dom: libvirt.virDomain) -> int:
    """MemTotal inside the guest in KiB (shrinks as the balloon inflates)."""
    line = agent_sh(dom, "grep MemTotal /proc/meminfo")
    return int(line.split()[1])


def guest_disk_by_serial(dom: libvirt.virDomain, serial: str) -> str | None:
    """Guest block device name (e.g. ``vdb``) whose serial is ``serial``, or None."""
    out = agent_sh(
        dom,
        "for b in /sys/block/*; do [ -e $b/serial ] && echo ${b##*/} $(cat $b/serial); done; true",
    )
    for line in out.splitlines():
        parts = line.split(maxsplit=1)
        if len(parts) == 2 and parts[1].strip() == serial:
            return parts[0]
    return None


# --------------------------------------------------------------------------------------------
# Waiting
# --------------------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "condition"
) -> tuple[T, float]:
    """Poll ``predicate`` until it returns a truthy value; returns (value, seconds waited)."""
    t0 = time.monotonic()
    while True:
        value = predicate()
        if value:
            return value, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what} not reached after {timeout} s (last: {value!r})")
        time.sleep(interval)


def wait_state(dom: libvirt.virDomain, state: int, timeout: float = 60.0) -> float:
    """Wait until ``dom.state()[0] == state`` (e.g. ``libvirt.VIR_DOMAIN_SHUTOFF``)."""
    _, waited = wait_until(lambda: dom.state()[0] == state, timeout, 0.1, f"{dom.name()} state {state}")
    return waited
