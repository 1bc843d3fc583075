"""End-to-end proof that the tiny guest and the QEMU driver do what the project needs.

Usage (as root, after scripts/setup-libvirt.sh and scripts/build-guest.sh OUTDIR):

    .venv/bin/python tests/integration/smoke_guest.py OUTDIR

Defines and starts one guest on qemu:///system, then through libvirt and the guest agent:
reads CPUs and memory inside, checks the application, takes and reverts an internal
snapshot while running (before any vCPU hotplug: a snapshot taken after one cannot be
reverted), hot-adds a vCPU, balloons memory down and up, attaches and detaches a qcow2 disk
with a serial, shuts down by ACPI, snapshots while off, boots again and shuts down through
the agent. Everything it made is removed at the end, also on failure. Prints timings.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import libvirt  # noqa: E402

import guest as g  # noqa: E402

PREFIX = "vmflow-smoke-"
VCPUS_MAX = 4
MEM_MAX_KIB = 256 * 1024

timings: list[tuple[str, float]] = []


class Step:
    """Times a block and records it; prints progress as it goes."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        print(f"  .. {self.name}", flush=True)
        self.t0 = time.monotonic()
        return self

    def __exit__(self, exc_type, exc, tb):
        dt = time.monotonic() - self.t0
        timings.append((self.name + ("" if exc_type is None else "  [FAILED]"), dt))
        print(f"  {'ok' if exc_type is None else 'FAIL'} {self.name}: {dt:.2f} s", flush=True)
        return False


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)


def remove_stale(conn: libvirt.virConnect) -> None:
    """Domains of earlier runs that died without cleaning up (their pid is gone)."""
    for dom in conn.listAllDomains():
        name = dom.name()
        if name.startswith(PREFIX):
            pid = name[len(PREFIX):]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                print(f"removing stale domain {name}")
                g.remove_domain(conn, name)


def run(conn: libvirt.virConnect, guest_dir: str, work: str, name: str) -> None:
    kernel, initrd, root = g.guest_artifacts(guest_dir)
    disk = g.make_overlay(root, os.path.join(work, "root.qcow2"))
    serial_log = os.path.join(work, "serial.log")
    xml = g.domain_xml(
        name, kernel, initrd, disk,
        vcpus_max=VCPUS_MAX, vcpus_current=1,
        memory_max_kib=MEM_MAX_KIB, memory_kib=MEM_MAX_KIB,
        serial_log=serial_log,
    )

    with Step("define + start"):
        dom = conn.defineXML(xml)
        dom.create()
    with Step("boot to agent"):
        g.wait_agent(dom, timeout=120)

    with Step("agent exec: count processors"):
        code, out, err = g.agent_exec(dom, ["sh", "-c", "cat /proc/cpuinfo | grep -c processor"])
        check(code == 0 and out.strip() == "1", f"expected 1 processor, got {code} {out!r} {err!r}")
    with Step("agent exec: MemTotal"):
        code, out, _ = g.agent_exec(dom, ["grep", "MemTotal", "/proc/meminfo"])
        mem0 = int(out.split()[1])
        check(code == 0 and 0 < mem0 <= MEM_MAX_KIB, f"MemTotal {out!r}")
        print(f"     guest MemTotal {mem0} KiB")
    with Step("app health (pidof nginx, http GET)"):
        code, out, _ = g.agent_exec(dom, ["pidof", "nginx"])
        check(code == 0 and out.strip(), "nginx not running in guest")
        body = g.agent_sh(dom, "wget -q -O - http://127.0.0.1/")
        check("vmflow guest app" in body, f"unexpected page {body!r}")

    # Snapshots before any vCPU hotplug (see module doc).
    with Step("snapshot create (running, internal)"):
        g.agent_sh(dom, "echo before > /data/marker; sync")
        snap = dom.snapshotCreateXML("<domainsnapshot><name>s1</name></domainsnapshot>", 0)
    g.agent_sh(dom, "echo after > /data/marker; sync")
    with Step("snapshot revert (running)"):
        dom.revertToSnapshot(snap, 0)
        check(dom.isActive() == 1, "domain not running after revert")
    with Step("agent after revert"):
        g.wait_agent(dom, timeout=60)
        marker = g.agent_sh(dom, "cat /data/marker").strip()
        check(marker == "before", f"marker after revert is {marker!r}")
    snap.delete(0)

    with Step("vCPU hotplug API (1 -> 2)"):
        dom.setVcpusFlags(2, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    with Step("vCPU online in guest"):
        g.wait_until(lambda: g.guest_online_cpus(dom) == 2, 30, 0.1, "2 CPUs online in guest")
    with Step("vCPU offline/online via agent (VCPU_GUEST)"):
        dom.setVcpusFlags(1, libvirt.VIR_DOMAIN_VCPU_GUEST)
        g.wait_until(lambda: g.guest_online_cpus(dom) == 1, 10, 0.1, "1 CPU online")
        dom.setVcpusFlags(2, libvirt.VIR_DOMAIN_VCPU_GUEST)
        g.wait_until(lambda: g.guest_online_cpus(dom) == 2, 10, 0.1, "2 CPUs online")

    target = 160 * 1024
    with Step("balloon API (256 -> 160 MiB)"):
        dom.setMemoryFlags(target, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    with Step("balloon followed in guest"):
        # MemTotal drops by the ballooned amount (kernel reserves keep it below the target).
        g.wait_until(lambda: g.guest_memtotal_kib(dom) <= mem0 - (MEM_MAX_KIB - target) + 1024,
                     30, 0.2, "MemTotal shrinks")
        stats = dom.memoryStats()
        check(stats.get("actual") == target, f"balloon actual {stats.get('actual')}")
        print(f"     guest MemTotal {g.guest_memtotal_kib(dom)} KiB, stats keys {sorted(stats)}")
    with Step("balloon back up (160 -> 256 MiB)"):
        dom.setMemoryFlags(MEM_MAX_KIB, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        g.wait_until(lambda: g.guest_memtotal_kib(dom) >= mem0 - 1024, 30, 0.2, "MemTotal grows")

    data = g.make_qcow2(os.path.join(work, "data.qcow2"), 16)
    dxml = g.disk_xml(data, "vdb", "smoke-data")
    with Step("disk attach API"):
        dom.attachDeviceFlags(dxml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    with Step("disk visible in guest (/sys/block, by serial)"):
        dev, _ = g.wait_until(lambda: g.guest_disk_by_serial(dom, "smoke-data"), 30, 0.1, "disk in guest")
        size = int(g.agent_sh(dom, f"cat /sys/block/{dev}/size").strip())
        check(size * 512 == 16 * 1024 * 1024, f"{dev} has {size} sectors")
        print(f"     guest sees it as {dev}")
    with Step("disk detach (until gone from live XML and guest)"):
        dom.detachDeviceFlags(dxml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        g.wait_until(lambda: "smoke-data" not in dom.XMLDesc(0), 15, 0.1, "disk gone from live XML")
        g.wait_until(lambda: g.guest_disk_by_serial(dom, "smoke-data") is None, 15, 0.1, "disk gone in guest")

    with Step("ACPI shutdown to shutoff"):
        dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        g.wait_state(dom, libvirt.VIR_DOMAIN_SHUTOFF, 60)
    with Step("snapshot create (off)"):
        snap = dom.snapshotCreateXML("<domainsnapshot><name>off1</name></domainsnapshot>", 0)
    with Step("snapshot revert (off)"):
        dom.revertToSnapshot(snap, 0)
        check(dom.isActive() == 0, "domain running after reverting an offline snapshot")
    snap.delete(0)

    with Step("start again to agent"):
        dom.create()
        g.wait_agent(dom, timeout=120)
        marker = g.agent_sh(dom, "cat /data/marker").strip()
        check(marker == "before", f"data disk lost its content across restart: {marker!r}")
    with Step("agent shutdown to shutoff"):
        dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
        g.wait_state(dom, libvirt.VIR_DOMAIN_SHUTOFF, 60)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} OUTDIR   (the directory build-guest.sh wrote)", file=sys.stderr)
        return 2
    guest_dir = os.path.abspath(argv[1])
    # Errors arrive as exceptions; the default handler would also print expected ones
    # (lookups of domains that are not there).
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(g.URI)
    remove_stale(conn)
    name = f"{PREFIX}{os.getpid()}"
    work = g.make_workdir(prefix=name + "-")
    t0 = time.monotonic()
    ok = False
    print(f"smoke guest {name} (work dir {work})")
    try:
        run(conn, guest_dir, work, name)
        ok = True
    except Exception:
        traceback.print_exc()
        log = os.path.join(work, "serial.log")
        if os.path.exists(log):
            with open(log, errors="replace") as f:
                tail = f.read()[-3000:]
            print(f"--- serial console (tail) ---\n{tail}\n--- end ---", file=sys.stderr)
    finally:
        g.remove_domain(conn, name)
        shutil.rmtree(work, ignore_errors=True)
        conn.close()
    total = time.monotonic() - t0
    print("\ntimings:")
    for step, dt in timings:
        print(f"  {dt:7.2f} s  {step}")
    print(f"  {total:7.2f} s  total")
    print("SMOKE PASSED" if ok else "SMOKE FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
