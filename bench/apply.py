"""First apply of N new small VMs on qemu:///system: vmflow against Ansible's community.libvirt.virt.

    python bench/apply.py [--vms 100] [--runs 1] [--ansible-venv DIR]

Both sides start from no domains and create the same N VMs (32 MiB, 1 vCPU, no disk, TCG; no guest OS
is needed: each VM boots into its firmware and waits), from the same domain XML: vmflow renders it from a
generated program; the Ansible playbook defines each VM from that XML and then sets it running, one item
after the other as the module works. Between runs every domain is destroyed and undefined (in parallel,
outside the timing). Ansible (the `ansible` package from PyPI, which carries community.libvirt, plus lxml
which the module needs) is installed into its own virtual environment on first use.

Target: vmflow at least 5x faster than Ansible.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PREFIX = "vmfbench"
URI = "qemu:///system"

IMAGE = """\
id: bench-empty
description: no disk and no OS; the VM waits in its firmware (benchmarks only)
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


def run_vmflow(folder: Path, image_root: Path) -> float:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "controller.cli", "apply", str(folder), "--libvirt", URI,
                        "--image-root", str(image_root), "--auto-approve", "--no-color"], cwd=ROOT,
                       capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"vmflow apply failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return dt


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


def run_ansible(playbook_bin: Path, xmls: dict[str, str], work: Path) -> float:
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
    t = time.perf_counter()
    r = subprocess.run([str(playbook_bin), "-i", "localhost,", str(work / "play.yml")], capture_output=True,
                       text=True, env=env)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"ansible-playbook failed:\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=100)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--ansible-venv", type=Path, default=Path(tempfile.gettempdir()) / "vmflow-bench-ansible")
    a = ap.parse_args()
    playbook = ansible_env(a.ansible_venv)
    ours, theirs = [], []
    with tempfile.TemporaryDirectory(prefix="vmflow-apply-bench-") as d:
        work = Path(d)
        folder = work / "bench"
        (folder / "images").mkdir(parents=True)
        (folder / "images" / "bench-empty.yaml").write_text(IMAGE)
        (folder / "main.flow").write_text(program(a.vms))
        # The image: an empty 16 MiB qcow2. Each VM boots an overlay of it (vmflow's image repository) and
        # its firmware, finding nothing to boot, waits.
        image_root = work / "image-root"
        image_root.mkdir(mode=0o755)
        os.chmod(work, 0o755)  # QEMU runs as another user and must reach the disk files
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image_root / "bench-empty.qcow2"), "16M"],
                       check=True)
        for _ in range(a.runs):
            cleanup()
            ours.append(run_vmflow(folder, image_root))
            xmls = domain_xmls()
            assert len(xmls) == a.vms, f"vmflow made {len(xmls)} domains"
            print(f"cleanup after vmflow: {cleanup():.1f} s", flush=True)
            for f in (folder / ".vmflow").glob("*"):
                if f.is_file():
                    f.unlink()
            theirs.append(run_ansible(playbook, xmls, work))
            print(f"cleanup after ansible: {cleanup():.1f} s", flush=True)
    o, t = statistics.median(ours), statistics.median(theirs)
    print(f"first apply of {a.vms} VMs on {URI}: vmflow {o:.1f} s, Ansible community.libvirt.virt {t:.1f} s "
          f"(median of {a.runs}): vmflow is {t / o:.1f}x faster   (target >= 5x)")


if __name__ == "__main__":
    main()
