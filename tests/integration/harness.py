"""What the real-QEMU tests share: where the tiny guest is, the image schema they write for it, the check
that libvirtd and the guest are there (a failure under `CI=true`, a skip otherwise), commands run inside
the guest through the agent, and the timings they print at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUEST_DIR = Path(os.environ.get("VMFLOW_GUEST_DIR") or "/var/lib/vmflow-guest")
URI = "qemu:///system"
CMDLINE = "console=ttyS0 panic=-1 memhp_default_state=online_movable quiet"

IMAGE = """\
id: {id}
os: vmflow-tiny
source: {{path: root.qcow2}}
boot: {{kernel: vmlinuz, initrd: initrd.gz, cmdline: "{cmdline}"}}
resources:
  cpu: {{min: 1, max: 4}}
  memory: {{min: 64MiB, max: 512MiB}}
capabilities: [cpu_hotplug, memory_balloon, disk_hotplug, nic_hotplug, guest_agent]
roles: [general]
"""


def unavailable(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"the QEMU integration tests cannot run under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def open_qemu():
    """A connection to libvirtd, once the tiny guest is there (built when missing and root)."""
    from controller.hypervisor import Hypervisor, HypervisorError

    try:
        hv = Hypervisor(URI)
    except HypervisorError as e:
        unavailable(f"libvirtd is not reachable at {URI} ({e}); run scripts/setup-libvirt.sh as root")
    if not all((GUEST_DIR / f).is_file() for f in ("vmlinuz", "initrd.gz", "root.qcow2")):
        if os.geteuid() == 0:
            subprocess.run([str(ROOT / "scripts" / "build-guest.sh"), str(GUEST_DIR)], check=True)
        else:
            unavailable(f"the tiny guest is not built in {GUEST_DIR}: run scripts/build-guest.sh {GUEST_DIR}")
    return hv


def make_work(prefix: str) -> Path:
    # QEMU runs as libvirt-qemu: every folder on the way to a disk must be traversable (mkdtemp is 0700).
    work = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    os.chmod(work, 0o755)
    return work


def discard(hv, name: str, work: Path) -> bool:
    """Remove the test's VM and files; False (and nothing removed) with VMFLOW_KEEP_VM set, for a look."""
    from controller.hypervisor import HypervisorError

    if os.environ.get("VMFLOW_KEEP_VM"):
        print(f"\nkept {name}, files in {work}")
        return False
    try:
        if hv.exists(name):
            hv.stop(name)
            hv.undefine(name)
    except HypervisorError:
        pass
    shutil.rmtree(work, ignore_errors=True)
    return True


class InGuest:
    """Commands inside the guest `self.name` on `self.hv`, through the guest agent."""

    hv = None
    name = ""

    def sh(self, script: str) -> tuple[int, str]:
        code, out, err = self.hv.guest_exec(self.name, ["sh", "-c", script], timeout=20)
        return code, out + err

    def out(self, script: str) -> str:
        code, out = self.sh(script)
        assert code == 0, (script, out)
        return out.strip()

    def until(self, fn, timeout: float = 30.0, what: str = ""):
        deadline = time.monotonic() + timeout
        while True:
            value = fn()
            if value:
                return value
            assert time.monotonic() < deadline, f"not reached in {timeout} s: {what} (last {value!r})"
            time.sleep(0.2)

    def online_cpus(self) -> int:
        return int(self.out("grep -c ^processor /proc/cpuinfo"))

    def memtotal(self) -> int:
        return int(self.out("grep MemTotal /proc/meminfo").split()[1])


class Timings(list):
    """(what, seconds) of each timed step, printed when the tests end."""

    @contextlib.contextmanager
    def timed(self, what: str):
        t = time.monotonic()
        failed = True
        try:
            yield
            failed = False
        finally:
            self.append((what + (" [failed]" if failed else ""), time.monotonic() - t))

    def report(self, title: str) -> None:
        print(f"\n{title}:")
        for what, seconds in self:
            print(f"  {seconds:6.2f} s  {what}")
