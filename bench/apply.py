"""First apply of N new small VMs on qemu:///system: vmflow against Ansible's community.libvirt.virt.

    python bench/apply.py [--vms 100] [--runs 1] [--warmup 1] [--guest halt|firmware] [--ansible-venv DIR]

Both sides start from no domains and create the same N VMs (32 MiB, 1 vCPU, TCG, a boot overlay of a 16 MiB
image; no guest OS is needed), from the same domain XML: vmflow renders it from a generated program; the
Ansible playbook defines each VM from that XML and then sets it running, one item after the other as the
module works. Between runs every domain is destroyed and undefined (in parallel, outside the timing).
Ansible (the `ansible` package from PyPI, which carries community.libvirt, plus lxml which the module
needs) is installed into its own virtual environment on first use.

The guest: neither tool needs an OS, so each VM boots a 16 MiB image and idles. With `halt` (the default)
the image holds a boot sector that stops the vCPU (`cli; hlt`), as an idle guest would: about 2 ms of QEMU's
CPU per second per VM under TCG. With `firmware` the image is empty and each VM's firmware, finding nothing
to boot, retries every second in SeaBIOS, which under TCG costs about 7 ms per second per VM: 100 such VMs
take a third of this 2-core machine while the later ones start, so that workload measures the guests as
much as the tools (vmflow, which starts VMs in parallel, loses more to it than Ansible, which starts one at
a time). The README gives both.

Before the timed runs, one vmflow apply of the same domains runs untimed (`--warmup 1`) and its domains are
removed, so that neither tool meets cold caches or first-time files of each domain name. (Without it, run 1
gave the lowest ratio in two sessions, 4.64x and 4.82x against 5.10-5.44x after; with it, the warm-up itself
was not slower than the runs, so that may have been noise as much as a cold start.)

Each run prints both times and their ratio; the core-seconds libvirtd and QEMU took while vmflow ran, and
so the least time any tool could take here (each VM's start costs them the same whoever asks: about 0.23
core-s of QEMU, most of it answering libvirt's ~417 monitor commands, and 0.04-0.06 of libvirtd); and the
core-seconds everything else took meanwhile (`others`): on a shared machine a run with a large `others`
measures the neighbours as much as the tools. The summary gives the medians and every run's ratio.

Target: vmflow at least 5x faster than Ansible.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Self

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PREFIX = "vmfbench"
URI = "qemu:///system"

IMAGE = """\
id: bench-empty
description: no OS; the VM waits in its firmware or halts (benchmarks only)
os: none
source:
  path: bench-empty.qcow2
resources:
  cpu: {min: 1, max: 2}
  memory: {min: 16MiB, max: 256MiB}
capabilities: [cpu_hotplug, memory_balloon]
"""


def program(n: int) -> str:
    blocks = [f'pool local {{\n  host = "{URI}"\n}}\n']
    for i in range(n):
        blocks.append(f"vm {PREFIX}{i:03d} {{\n  image  = bench-empty\n  cpu    = 1\n  memory = 32MiB\n}}\n")
    return "\n".join(blocks)


def cleanup() -> float:
    """Destroy and undefine every benchmark domain, in parallel (a TCG domain takes seconds to reap)."""
    import libvirt

    libvirt.registerErrorHandler(lambda *_: None, None)
    conn = libvirt.open(URI)
    doms = [d for d in conn.listAllDomains() if d.name().startswith(PREFIX)]

    def kill(d):
        try:
            if d.isActive():
                d.destroy()
        except libvirt.libvirtError:
            pass
        try:
            d.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        except libvirt.libvirtError:
            pass

    t = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(kill, doms))
    conn.close()
    return time.perf_counter() - t


class Load:
    """Where the machine's CPU went while the block ran, in core-seconds: `hypervisor` is libvirtd and QEMU,
    `other` is everything but them and the timed tool (its whole process tree, reaped by us), from the busy
    time in /proc/stat. Every VM start costs libvirtd and QEMU the same whichever tool asks for it, so
    `hypervisor` divided by the cores is the least time any tool could take on this machine."""

    def __enter__(self) -> Self:
        self._t0 = self._sample()
        return self

    def __exit__(self, *exc) -> None:
        t1 = self._sample()
        busy, tool, hv = (b - a for a, b in zip(self._t0, t1))
        self.hypervisor = hv
        self.other = max(0.0, busy - tool - hv)

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        tick = os.sysconf("SC_CLK_TCK")
        cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(cpu[:8]) - cpu[3] - cpu[4]) / tick  # all but idle and iowait
        ours = resource.getrusage(resource.RUSAGE_CHILDREN)
        hv = 0.0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            if comm == "libvirtd" or comm.startswith("qemu-system"):
                f = stat.rsplit(")", 1)[1].split()
                hv += (int(f[11]) + int(f[12])) / tick
        return busy, ours.ru_utime + ours.ru_stime, hv


def run_vmflow(folder: Path, image_root: Path) -> tuple[float, Load]:
    with Load() as load:
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "controller.cli", "apply", str(folder), "--libvirt", URI,
                            "--image-root", str(image_root), "--auto-approve", "--no-color"], cwd=ROOT,
                           capture_output=True, text=True, check=False)
        dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"vmflow apply failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return dt, load


def forget_journal(folder: Path) -> None:
    """vmflow's journal and state go, so the next apply starts afresh; the VMs' disks and logs stay (in
    folders): Ansible's domains use the same files."""
    for f in (folder / ".vmflow").glob("*"):
        if f.is_file():
            f.unlink()


def domain_xmls() -> dict[str, str]:
    """The XML vmflow defined, read back (inactive), so Ansible defines exactly the same domains."""
    import libvirt

    conn = libvirt.open(URI)
    out = {d.name(): d.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) for d in conn.listAllDomains()
           if d.name().startswith(PREFIX)}
    conn.close()
    return out


def ansible_env(venv: Path) -> Path:
    if not (venv / "bin" / "ansible-playbook").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "ansible", "lxml", "libvirt-python"], check=True)
    return venv / "bin" / "ansible-playbook"


def run_ansible(playbook_bin: Path, xmls: dict[str, str], work: Path) -> tuple[float, Load]:
    items = [{"name": n, "xml": x.replace("<uuid>", "<!--").replace("</uuid>", "-->")} for n, x in sorted(xmls.items())]
    (work / "vms.json").write_text(json.dumps(items))
    (work / "play.yml").write_text(f"""\
- hosts: localhost
  connection: local
  gather_facts: false
  vars:
    vms: "{{{{ lookup('file', '{work}/vms.json') | from_json }}}}"
  tasks:
    - name: define
      community.libvirt.virt:
        command: define
        xml: "{{{{ item.xml }}}}"
        uri: {URI}
      loop: "{{{{ vms }}}}"
    - name: start
      community.libvirt.virt:
        name: "{{{{ item.name }}}}"
        state: running
        uri: {URI}
      loop: "{{{{ vms }}}}"
""")
    env = dict(os.environ, ANSIBLE_PYTHON_INTERPRETER=str(playbook_bin.parent / "python"),
               ANSIBLE_LOCALHOST_WARNING="False", ANSIBLE_INVENTORY_UNPARSED_WARNING="False")
    with Load() as load:
        t = time.perf_counter()
        r = subprocess.run([str(playbook_bin), "-i", "localhost,", str(work / "play.yml")], capture_output=True,
                           text=True, env=env, check=False)
        dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"ansible-playbook failed:\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}")
    return dt, load


def make_image(path: Path, guest: str) -> None:
    if guest == "firmware":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
        return
    raw = path.with_suffix(".raw")
    with raw.open("wb") as f:
        # A master boot record whose code disables interrupts and halts (again, should anything wake it).
        f.write(bytes([0xFA, 0xF4, 0xEB, 0xFD]).ljust(510, b"\0") + b"\x55\xaa")
        f.truncate(16 * 1024 * 1024)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=100)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--guest", choices=("halt", "firmware"), default="halt",
                    help="what the VMs run: a boot sector that halts, or the firmware's retries for a boot disk")
    ap.add_argument("--warmup", type=int, default=1, help="untimed vmflow applies first (warm caches)")
    ap.add_argument("--ansible-venv", type=Path, default=Path(tempfile.gettempdir()) / "vmflow-bench-ansible")
    a = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    playbook = ansible_env(a.ansible_venv)
    ours, theirs = [], []
    with tempfile.TemporaryDirectory(prefix="vmflow-apply-bench-") as d:
        work = Path(d)
        folder = work / "bench"
        (folder / "images").mkdir(parents=True)
        (folder / "images" / "bench-empty.yaml").write_text(IMAGE)
        (folder / "main.flow").write_text(program(a.vms))
        # The image, a 16 MiB qcow2: each VM boots an overlay of it (vmflow's image repository).
        image_root = work / "image-root"
        image_root.mkdir(mode=0o755)
        os.chmod(work, 0o755)  # QEMU runs as another user and must reach the disk files
        make_image(image_root / "bench-empty.qcow2", a.guest)
        for i in range(a.warmup):
            cleanup()
            dt, _ = run_vmflow(folder, image_root)
            print(f"warm-up {i + 1}: vmflow {dt:.1f} s (not counted)", flush=True)
            forget_journal(folder)
        for i in range(a.runs):
            cleanup()
            ours.append(run_vmflow(folder, image_root))
            xmls = domain_xmls()
            assert len(xmls) == a.vms, f"vmflow made {len(xmls)} domains"
            cleanup()
            forget_journal(folder)
            theirs.append(run_ansible(playbook, xmls, work))
            cleanup()
            (o, lo), (t, lt) = ours[-1], theirs[-1]
            print(f"run {i + 1}: vmflow {o:.1f} s, Ansible {t:.1f} s: {t / o:.2f}x   (libvirtd + QEMU took "
                  f"{lo.hypervisor:.1f} core-s under vmflow, at least {lo.hypervisor / cores:.1f} s on {cores} "
                  f"cores, and {lt.hypervisor:.1f} under Ansible; others took {lo.other:.1f} core-s during "
                  f"vmflow's run, {lt.other:.1f} during Ansible's)", flush=True)
    o, t = statistics.median(x for x, _ in ours), statistics.median(x for x, _ in theirs)
    ratios = ", ".join(f"{b / a_:.2f}x" for (a_, _), (b, _) in zip(ours, theirs))
    print(f"first apply of {a.vms} VMs on {URI} ({a.guest} guest): vmflow {o:.1f} s, Ansible "
          f"community.libvirt.virt {t:.1f} s (medians of {a.runs}); per run {ratios}   (target >= 5x)")


if __name__ == "__main__":
    main()
