"""The hypervisor adapter: the only module that imports `libvirt`.

Everything vmflow does to a host passes through `Hypervisor`: observing every domain in one pass, and the
few mutations apply needs. Each mutation is a named method, so faults can be injected at this boundary
(`FaultyHypervisor` in the tests) rather than by patching libvirt. libvirt errors become `HypervisorError`
with a `temporary` flag (the host is unreachable or busy: retry later) or not (the request is refused:
retrying the same request will not help).
"""

from __future__ import annotations

from dataclasses import dataclass

import libvirt

from controller import domain_xml
from controller.state import METADATA_NS, METADATA_PREFIX, ActualState, Unmanaged, VmState

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
        self.capabilities = Capabilities(driver, driver != "test", driver != "test")
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
            try:
                xml = dom.XMLDesc(0)
                snaps = tuple(sorted(dom.snapshotListNames())) if snapshots else ()
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    continue  # undefined while we looked: it is simply not there
                raise _wrap(f"observe {dom.name()}", e) from None
            state = domain_xml.parse(xml, snaps, dom.name() in active)
            if isinstance(state, Unmanaged):
                unmanaged.append(state)
            else:
                vms[state.name] = state
        return ActualState(vms, tuple(sorted(unmanaged, key=lambda u: u.name)), self.uri)

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

    def revert(self, name: str, snapshot: str) -> None:
        self._call("revert", name, lambda d: d.revertToSnapshot(d.snapshotLookupByName(snapshot, 0), 0))

    def delete_snapshot(self, name: str, snapshot: str) -> None:
        self._call("delete snapshot", name, lambda d: d.snapshotLookupByName(snapshot, 0).delete(0))

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
