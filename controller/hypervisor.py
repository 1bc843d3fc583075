"""The hypervisor adapter: the only module that imports `libvirt`.

Everything vmflow does to a host passes through `Hypervisor`: observing every domain in one pass, and the
few mutations apply needs. Each mutation is a named method, so faults can be injected at this boundary
(`FaultyHypervisor` in the tests) rather than by patching libvirt. libvirt errors become `HypervisorError`
with a `temporary` flag (the host is unreachable or busy: retry later) or not (the request is refused:
retrying the same request will not help).

Guest-side operations (graceful shutdown, health checks) go through the QEMU guest agent; on the test driver,
which has no guest, they fall back to what it can do (a hard stop; "running" as the health check).

The monitor reads every domain's counters in one bulk call (`stats`); the test driver's bulk call reports
only run states, so there each running domain's vCPUs and CPU time come from its (in-process) `info`.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass

import libvirt
import libvirt_qemu

from controller import domain_xml
from controller.state import (
    METADATA_NS,
    METADATA_PREFIX,
    ActualState,
    Unmanaged,
    VmState,
)

# Without a handler libvirt prints every error to stderr, even those vmflow handles.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

_TEMPORARY = {
    libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
}


class HypervisorError(Exception):
    def __init__(self, operation: str, message: str, temporary: bool = False) -> None:
        super().__init__(f"{operation}: {message}")
        self.operation = operation
        self.temporary = temporary


@dataclass(frozen=True)
class Capabilities:
    """What this connection's driver can do; the test driver refuses device hotplug, for one."""

    driver: str
    device_hotplug: bool
    guest_agent: bool
    # A live vCPU unplug times out on QEMU (HYPERVISOR.md); the test driver pretends to do it.
    cpu_unplug: bool


@dataclass(frozen=True, slots=True)
class DomainStats:
    """One domain's counters from one bulk statistics call. Counters are cumulative since the domain's
    process started (they go back to zero when it restarts); None where the driver did not report them
    (a stopped domain, a guest without balloon statistics, the test driver's missing groups)."""

    name: str
    state: str  # running | blocked | paused | shutdown | shutoff | crashed | pmsuspended | nostate
    cpu_time_ns: int | None = None
    vcpus: int | None = None
    balloon_current_kib: int | None = None  # memory the guest has now (the balloon's size)
    balloon_available_kib: int | None = None  # memory the guest's kernel sees (MemTotal)
    balloon_usable_kib: int | None = None  # what it could use without swapping (MemAvailable)
    balloon_unused_kib: int | None = None  # left completely unused (MemFree)
    block_rd_bytes: int | None = None  # summed over the domain's disks
    block_wr_bytes: int | None = None
    net_rx_bytes: int | None = None  # summed over its interfaces
    net_tx_bytes: int | None = None

    @property
    def running(self) -> bool:
        return self.state in ("running", "blocked")


_STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate", libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked", libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown", libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed", libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}
_STATS_GROUPS = (libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
                 | libvirt.VIR_DOMAIN_STATS_BALLOON | libvirt.VIR_DOMAIN_STATS_VCPU
                 | libvirt.VIR_DOMAIN_STATS_INTERFACE | libvirt.VIR_DOMAIN_STATS_BLOCK)


def _summed(record: dict, group: str, field: str) -> int | None:
    """`block.0.rd.bytes + block.1.rd.bytes + ...`; None when the group reports no such counter."""
    count = record.get(f"{group}.count")
    if not count:
        return None
    values = [record.get(f"{group}.{i}.{field}") for i in range(count)]
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _domain_stats(name: str, record: dict) -> DomainStats:
    return DomainStats(
        name=name,
        state=_STATE_NAMES.get(record.get("state.state", 0), "nostate"),
        cpu_time_ns=record.get("cpu.time"),
        vcpus=record.get("vcpu.current"),
        balloon_current_kib=record.get("balloon.current"),
        balloon_available_kib=record.get("balloon.available"),
        balloon_usable_kib=record.get("balloon.usable"),
        balloon_unused_kib=record.get("balloon.unused"),
        block_rd_bytes=_summed(record, "block", "rd.bytes"),
        block_wr_bytes=_summed(record, "block", "wr.bytes"),
        net_rx_bytes=_summed(record, "net", "rx.bytes"),
        net_tx_bytes=_summed(record, "net", "tx.bytes"),
    )


def _wrap(operation: str, e: libvirt.libvirtError) -> HypervisorError:
    return HypervisorError(operation, e.get_error_message() or str(e), e.get_error_code() in _TEMPORARY)


class Hypervisor:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        try:
            self.conn = libvirt.open(uri)
        except libvirt.libvirtError as e:
            raise _wrap(f"connect {uri}", e) from None
        driver = self.conn.getType().lower()
        self.capabilities = Capabilities(driver, driver != "test", driver != "test", driver == "test")
        self.domain_type = "test" if driver == "test" else "qemu"

    def close(self) -> None:
        try:
            self.conn.close()
        except libvirt.libvirtError:
            pass

    def __enter__(self) -> Hypervisor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- observing
    def observe(self, snapshots: bool = True) -> ActualState:
        """Every domain, in one pass: owned ones as VmState, the rest as Unmanaged. Planning does not need
        snapshot names (one more call per domain), so it can leave them out."""
        try:
            domains = self.conn.listAllDomains()
            active = {d.name() for d in self.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}
        except libvirt.libvirtError as e:
            raise _wrap("list domains", e) from None
        vms: dict[str, VmState] = {}
        unmanaged: list[Unmanaged] = []
        for dom in domains:
            state = self._read(dom, snapshots, lambda d: d.name() in active)
            if state is None:
                continue  # undefined while we looked: it is simply not there
            if isinstance(state, Unmanaged):
                unmanaged.append(state)
            else:
                vms[state.name] = state
        return ActualState(vms, tuple(sorted(unmanaged, key=lambda u: u.name)), self.uri)

    def observe_vm(self, name: str, snapshots: bool = False) -> VmState | None:
        """One domain, as `observe` sees it: what verification re-reads after a change (reading every
        domain there would make an apply of N VMs cost N² reads)."""
        try:
            dom = self.conn.lookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise _wrap(f"observe {name}", e) from None
        state = self._read(dom, snapshots, lambda d: bool(d.isActive()))
        return state if isinstance(state, VmState) else None

    @staticmethod
    def _read(dom, snapshots: bool, running) -> VmState | Unmanaged | None:
        """One domain's XML (and snapshot names) as state; None when it vanished while being read."""
        try:
            xml = dom.XMLDesc(0)
            snaps = tuple(sorted(dom.snapshotListNames())) if snapshots else ()
            active = running(dom)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise _wrap(f"observe {dom.name()}", e) from None
        return domain_xml.parse(xml, snaps, active)

    def export(self) -> list[tuple[str, bool, list[tuple[str, bool]]]]:
        """Every domain as (XML, running, [(snapshot XML, is current)]): what the embedded default saves."""
        out = []
        try:
            for dom in self.conn.listAllDomains():
                current = dom.snapshotCurrent(0).getName() if dom.hasCurrentSnapshot(0) else None
                snaps = [(s.getXMLDesc(0), s.getName() == current) for s in dom.listAllSnapshots(0)]
                out.append((dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE), bool(dom.isActive()), snaps))
        except libvirt.libvirtError as e:
            raise _wrap("export", e) from None
        return out

    def stats(self, names: Iterable[str] | None = None) -> dict[str, DomainStats]:
        """Every domain's counters (or those of `names`), from one bulk call. NOWAIT: a domain busy with a
        job (a snapshot being taken) reports what it can at once instead of holding up the whole call, so
        some of its counters may be missing this time. Domains in `names` that do not exist are left out.

        The test driver's bulk call reports run states only; its running domains get vCPUs, CPU time and
        balloon size from `info` (in-process, microseconds each). Its CPU time is the wall clock, so a
        test-driver VM always reads as 100/vCPUs % busy, and it has no guest memory, disk or network
        counters."""
        try:
            records = self.conn.getAllDomainStats(_STATS_GROUPS,
                                                  libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT)
        except libvirt.libvirtError as e:
            raise _wrap("read statistics", e) from None
        want = None if names is None else set(names)
        test = self.capabilities.driver == "test"
        out: dict[str, DomainStats] = {}
        for dom, record in records:
            try:
                name = dom.name()
                if want is not None and name not in want:
                    continue
                if test and "cpu.time" not in record and record.get("state.state") == libvirt.VIR_DOMAIN_RUNNING:
                    _state, _max_kib, kib, vcpus, cpu_ns = dom.info()
                    st = DomainStats(name, "running", cpu_time_ns=cpu_ns, vcpus=vcpus, balloon_current_kib=kib)
                else:
                    st = _domain_stats(name, record)
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    continue  # undefined since the call: it is simply not there
                raise _wrap("read statistics", e) from None
            out[name] = st
        return out

    def has_agent(self, name: str) -> bool:
        """Whether the domain has a guest-agent channel on a driver that can talk to it."""
        if not self.capabilities.guest_agent:
            return False
        doc = ET.fromstring(self.xml(name))
        return any(t.get("name") == domain_xml.AGENT_CHANNEL for t in doc.iterfind("devices/channel/target"))

    def app_running(self, name: str, app: str, timeout: float = 5.0) -> bool | None:
        """Whether an application runs in the guest, as the `app("x") running` health check asks it
        (`pidof x`), once and without waiting for the guest to boot; None when the agent does not answer."""
        try:
            code, _, _ = self.guest_exec(name, ["pidof", str(app)], timeout=timeout)
        except HypervisorError:
            return None
        return code == 0

    def xml(self, name: str, inactive: bool = False) -> str:
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return self._call("read", name, lambda d: d.XMLDesc(flags))

    # -- mutations (each one a fault-injection point)
    def define(self, xml: str) -> None:
        try:
            self.conn.defineXML(xml)
        except libvirt.libvirtError as e:
            raise _wrap("define", e) from None

    def start(self, name: str) -> None:
        self._call("start", name, lambda d: d.create())

    def stop(self, name: str) -> None:
        """Hard stop (destroy in libvirt's words); the domain stays defined."""
        self._call("stop", name, lambda d: d.destroy() if d.isActive() else None)

    def undefine(self, name: str) -> None:
        flags = libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        self._call("undefine", name, lambda d: d.undefineFlags(flags))

    def set_vcpus(self, name: str, count: int, live: bool) -> None:
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if live else 0)
        self._call("set vcpus", name, lambda d: d.setVcpusFlags(count, flags))

    def set_memory(self, name: str, kib: int, live: bool) -> None:
        # Two calls: some drivers (the test driver among them) refuse LIVE and CONFIG together here.
        if live:
            self._call("set memory", name, lambda d: d.setMemoryFlags(kib, libvirt.VIR_DOMAIN_AFFECT_LIVE))
        self._call("set memory", name, lambda d: d.setMemoryFlags(kib, libvirt.VIR_DOMAIN_AFFECT_CONFIG))

    def set_owner(self, name: str, record: str) -> None:
        """Replace vmflow's ownership record, in the running domain and in its config alike."""
        def put(d):
            flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if d.isActive() else 0)
            d.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, record, METADATA_PREFIX, METADATA_NS, flags)
        self._call("set owner", name, put)

    def has_snapshot(self, name: str, snapshot: str) -> bool:
        return snapshot in self._call("list snapshots", name, lambda d: d.snapshotListNames())

    def snapshot(self, name: str, snapshot: str) -> None:
        xml = f"<domainsnapshot><name>{snapshot}</name><description>vmflow</description></domainsnapshot>"
        self._call("snapshot", name, lambda d: d.snapshotCreateXML(xml, 0))

    def revert(self, name: str, snapshot: str) -> str | None:
        """Revert to a snapshot, its persistent config included; returns how, when not the plain way.

        A running snapshot taken after a live vCPU hotplug cannot be loaded again (QEMU's device state does
        not match), and loading one into a process with more vCPUs than it had fails too. So: the plain
        revert; else stop and revert into a new process; else restore the snapshot's config and the disks'
        contents (`qemu-img snapshot -a` on each qcow2, the domain being off) and boot it afresh: memory
        state is lost, disks and config are as they were."""
        def do(d):
            snap = d.snapshotLookupByName(snapshot, 0)
            try:
                d.revertToSnapshot(snap, 0)
                return None
            except libvirt.libvirtError:
                pass
            try:
                if d.isActive():
                    d.destroy()
                d.revertToSnapshot(snap, 0)
                return "reverted into a new QEMU process"
            except libvirt.libvirtError as e:
                err = e
            doc = ET.fromstring(snap.getXMLDesc(libvirt.VIR_DOMAIN_XML_SECURE))
            dom_el = doc.find("domain")
            if dom_el is None:
                raise err
            if d.isActive():
                d.destroy()
            for disk in dom_el.iter("disk"):
                src, drv = disk.find("source"), disk.find("driver")
                if src is None or not src.get("file") or drv is None or drv.get("type") != "qcow2":
                    continue
                r = subprocess.run(["qemu-img", "snapshot", "-a", snapshot, src.get("file")],
                                   capture_output=True, text=True, check=False)
                if r.returncode != 0:
                    raise HypervisorError(f"revert {name}", f"{err.get_error_message()}; restoring "
                                          f"{src.get('file')} failed too: {r.stderr.strip()}")
            self.conn.defineXML(ET.tostring(dom_el, encoding="unicode"))
            if doc.findtext("state") in ("running", "paused"):
                self.conn.lookupByName(name).create()
            return "the snapshot's memory state could not be loaded: restored its config and disks, and booted"
        how = self._call("revert", name, do)
        self._settle_balloon(name)
        return how

    def _settle_balloon(self, name: str, boot_timeout: float = 60.0, timeout: float = 10.0) -> None:
        """Set the balloon to the config's size again after a revert, once the guest is up: a loaded
        snapshot can leave QEMU's balloon target behind, and the guest then keeps all memory."""
        if not self.capabilities.guest_agent or not self.running(name):
            return
        want = domain_xml._kib(ET.fromstring(self.xml(name, inactive=True)).find("currentMemory"))
        if not want:
            return
        deadline = time.monotonic() + boot_timeout
        while not self.agent_ping(name) and time.monotonic() < deadline and self.running(name):
            time.sleep(0.2)
        deadline = time.monotonic() + timeout
        asked = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() - asked > 3:
                self._call("set memory", name, lambda d: d.setMemoryFlags(want, libvirt.VIR_DOMAIN_AFFECT_LIVE))
                asked = time.monotonic()
            if self._call("read", name, lambda d: d.memoryStats().get("actual")) == want:
                return
            time.sleep(0.2)

    def delete_snapshot(self, name: str, snapshot: str) -> None:
        """Delete a snapshot. One taken before an OS swap lives in a boot overlay the domain no longer
        uses, and QEMU refuses to touch it: its record is dropped, and the overlay goes with the last
        record that names it (`disk_files` tells which files are still named)."""
        def disks(el) -> set[tuple[str | None, str | None]]:
            return {(t.get("dev"), (disk.find("source").get("file") if disk.find("source") is not None else None))
                    for disk in el.iter("disk") if disk.get("device", "disk") == "disk"
                    for t in disk.findall("target")}

        def do(d):
            snap = d.snapshotLookupByName(snapshot, 0)
            inner = ET.fromstring(snap.getXMLDesc(0)).find("domain")
            # libvirt 9.0 dereferences a missing disk when the snapshot names a disk the domain no longer
            # has (detached since): the daemon crashes. Such a snapshot only loses its record.
            if inner is not None and not disks(inner) <= disks(ET.fromstring(d.XMLDesc(0))):
                snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
                return
            try:
                snap.delete(0)
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_OPERATION_UNSUPPORTED:
                    raise
                snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
        self._call("delete snapshot", name, do)

    def disk_files(self, name: str) -> set[str]:
        """Every file a disk of the domain or of one of its snapshots names."""
        def do(d):
            docs = [d.XMLDesc(0), d.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)]
            docs += [s.getXMLDesc(0) for s in d.listAllSnapshots(0)]
            return {src.get("file") for doc in docs for src in ET.fromstring(doc).iter("source")
                    if src.get("file")}
        return self._call("list disk files", name, do)

    def running(self, name: str) -> bool:
        return bool(self._call("read", name, lambda d: d.isActive()))

    def shutdown(self, name: str, timeout: float = 30.0) -> None:
        """Graceful stop: the guest agent's shutdown, else the ACPI power button; a hard stop when the guest
        has not powered off within `timeout` seconds. Without a guest (the test driver): a hard stop."""
        if not self.capabilities.guest_agent:
            self.stop(name)
            return
        dom = self._call("look up", name, lambda d: d)
        try:
            if not dom.isActive():
                return
            try:
                dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
            except libvirt.libvirtError:
                dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
            deadline = time.monotonic() + timeout
            while dom.isActive() and time.monotonic() < deadline:
                time.sleep(0.1)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
                return  # it stopped while we asked
            raise _wrap(f"shut down {name}", e) from None
        self.stop(name)  # no-op when it powered off in time

    # -- devices (QEMU only: the test driver refuses them)
    def _flags(self, d) -> int:
        return libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if d.isActive() else 0)

    def attach_device(self, name: str, xml: str) -> None:
        self._call("attach device", name, lambda d: d.attachDeviceFlags(xml, self._flags(d)))

    def update_device(self, name: str, xml: str) -> None:
        self._call("update device", name, lambda d: d.updateDeviceFlags(xml, self._flags(d)))

    def detach_disk(self, name: str, serial: str, wait: float = 5.0) -> None:
        """Detach the disk whose serial is `serial`, live and from the config. The guest releases the
        device in its own time: wait at most `wait` seconds, then trust only the live XML."""
        self._detach(name, lambda xml: domain_xml.find_disk(xml, serial), f"disk {serial}", wait)

    def detach_nic(self, name: str, mac: str, wait: float = 5.0) -> None:
        self._detach(name, lambda xml: domain_xml.find_nic(xml, mac), f"interface {mac}", wait)

    def _detach(self, name: str, find, what: str, wait: float) -> None:
        def do(d):
            live = d.XMLDesc(0)
            dev = find(live)
            if dev is not None:
                d.detachDeviceFlags(dev, self._flags(d))
            elif find(d.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) is not None:
                d.detachDeviceFlags(find(d.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)),
                                    libvirt.VIR_DOMAIN_AFFECT_CONFIG)
            deadline = time.monotonic() + wait
            while find(d.XMLDesc(0)) is not None:
                if time.monotonic() > deadline:
                    raise HypervisorError(f"detach {what} from {name}", f"the guest has not released it after "
                                          f"{wait:.0f} s")
                time.sleep(0.1)
        self._call(f"detach {what}", name, do)

    # -- the guest agent
    def agent(self, name: str, command: str, arguments: dict | None = None, timeout: int = 5):
        msg = {"execute": command, **({"arguments": arguments} if arguments is not None else {})}
        reply = self._call(command, name, lambda d: libvirt_qemu.qemuAgentCommand(d, json.dumps(msg),
                                                                                  max(1, int(timeout)), 0))
        data = json.loads(reply or "{}")
        if "error" in data:
            raise HypervisorError(f"{command} {name}", str(data["error"]))
        return data.get("return")

    def agent_ping(self, name: str) -> bool:
        try:
            self.agent(name, "guest-ping", timeout=2)
            return True
        except HypervisorError:
            return False

    def guest_exec(self, name: str, argv: list[str], timeout: float = 20.0) -> tuple[int, str, str]:
        """Run a program in the guest (guest-exec); (exit code, stdout, stderr). A signal gives 128+N."""
        pid = self.agent(name, "guest-exec", {"path": argv[0], "arg": list(argv[1:]), "capture-output": True},
                         timeout=10)["pid"]
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            st = self.agent(name, "guest-exec-status", {"pid": pid}, timeout=10)
            if st.get("exited"):
                break
            if time.monotonic() > deadline:
                raise HypervisorError(f"guest-exec {name}", f"{argv!r} still running after {timeout:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.25)
        out = base64.b64decode(st.get("out-data", "")).decode("utf-8", "replace")
        err = base64.b64decode(st.get("err-data", "")).decode("utf-8", "replace")
        code = int(st["exitcode"]) if "exitcode" in st else 128 + int(st.get("signal", 0))
        return code, out, err

    def health(self, name: str, kind: str | None, arg=None, boot_timeout: float = 90.0,
               check_timeout: float = 20.0) -> str | None:
        """None when the VM is healthy by its declared check, else why not. Every check needs the VM
        running; `agent`, `port(N)` and `app("x") running` also wait (up to `boot_timeout`) for the guest
        agent, then retry the check for up to `check_timeout` seconds (a service starts after the agent)."""
        if not self.running(name):
            return "not running"
        if not self.capabilities.guest_agent or kind in (None, "none"):
            return None  # the test driver has no guest: running is all it can show
        deadline = time.monotonic() + boot_timeout
        while not self.agent_ping(name):
            if time.monotonic() > deadline:
                return f"the guest agent did not answer within {boot_timeout:.0f} s"
            if not self.running(name):
                return "stopped while booting"
            time.sleep(0.2)
        if kind == "agent":
            return None
        if kind == "app":
            argv, what = ["pidof", str(arg)], f"application `{arg}` is not running"
        elif kind == "port":
            # busybox nc: -z (no data) is not in every build; an immediate EOF on stdin does the same.
            argv = ["sh", "-c", f"nc -w 2 127.0.0.1 {int(arg)} </dev/null >/dev/null 2>&1"]
            what = f"nothing answers on port {arg}"
        else:
            return f"unknown health check `{kind}`"
        deadline = time.monotonic() + check_timeout
        while True:
            try:
                code, _, _ = self.guest_exec(name, argv, timeout=10)
                if code == 0:
                    return None
            except HypervisorError:
                pass  # the agent may be restarting: retry until the deadline
            if time.monotonic() > deadline:
                return f"{what} (checked for {check_timeout:.0f} s)"
            time.sleep(0.5)

    def exists(self, name: str) -> bool:
        try:
            self.conn.lookupByName(name)
            return True
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            raise _wrap(f"look up {name}", e) from None

    def _call(self, operation: str, name: str, fn):
        try:
            return fn(self.conn.lookupByName(name))
        except libvirt.libvirtError as e:
            raise _wrap(f"{operation} {name}", e) from None
