"""Commit-to-applied latency of `vmflow controller` on a local repository, with the watcher.

    python bench/latency.py [--commits 15] [--big 1000]

Two runs, each a real `vmflow controller` process on the embedded default (libvirt's test driver) with a
real git repository in a temporary folder:

  small   one program of two VMs; each commit changes one VM's vCPUs
  big     a program of `--big` VMs over 20 files, its VMs already running as that revision left them;
          each commit changes one VM's vCPUs, so the controller must compile, observe and plan the
          whole program and apply one change: incremental compile (only the changed file is parsed)
          and plan, not a rebuild

Latency is measured from `git commit` returning to `/status` reporting the new revision applied (polled
every 5 ms, so it adds at most 5 ms). Targets: median under 1 s for both. For scale: Argo CD polls every
3 minutes by default, Flux every minute.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.generate import write_program  # noqa: E402
from tests.gitrepo import Repo  # noqa: E402

SMALL = """\
vm web {
  image  = linux-base
  cpu    = 2 .. 8
  memory = 2GiB .. 8GiB
}

vm api {
  image  = linux-base
  cpu    = 1 .. 4
  memory = 1GiB .. 4GiB
}
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as r:
            return json.loads(r.read())["status"]
    except OSError:
        return {}


def _applied(port: int) -> str | None:
    return (_status(port).get("revisions") or {}).get("last_applied")


def _controller(repo: Path, state: Path, subpath: str) -> tuple[subprocess.Popen, int]:
    port = _port()
    p = subprocess.Popen([sys.executable, "-m", "controller.cli", "controller", "--repo", str(repo), "--path", subpath,
                          "--state-dir", str(state), "--listen", f"127.0.0.1:{port}", "--resync", "3600",
                          "--log-level", "warning"],
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stderr=subprocess.PIPE, text=True)
    return p, port


def _wait_for(port: int, sha: str, timeout: float, proc: subprocess.Popen) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _applied(port) == sha:
            return time.monotonic()
        if proc.poll() is not None:
            raise SystemExit(f"the controller exited: {proc.stderr.read()}")
        time.sleep(0.005)
    raise SystemExit(f"revision {sha[:12]} was not applied within {timeout:.0f}s: {_status(port)}")


def _run(repo: Repo, state: Path, subpath: str, commits: int, change) -> list[tuple[float, float]]:
    proc, port = _controller(repo.path, state, subpath)
    try:
        _wait_for(port, repo.head(), 600, proc)
        out = []
        for i in range(commits):
            sha = change(i)
            t0 = time.monotonic()
            t1 = _wait_for(port, sha, 60, proc)
            took = (_status(port).get("last_reconcile") or {}).get("seconds") or 0.0
            out.append((t1 - t0, took))
        return out
    finally:
        proc.terminate()
        proc.wait(30)


def _seed(program_dir: Path, state: Path, name: str) -> None:
    """The big program's VMs as its first revision would have left them, written straight into the
    embedded hypervisor's state (applying 1,000 creates one by one is not what is measured here)."""
    from compiler.program import Compiler
    from controller import domain_xml, embedded
    from controller.hypervisor import Hypervisor
    from controller.state import desired_state

    comp = Compiler().compile_path(program_dir)
    assert comp.ok, comp.diagnostics[:3]
    with Hypervisor(embedded.uri(state)) as hv:
        for vm in comp.program.vms.values():
            hv.define(domain_xml.render(desired_state(vm, name)))
            hv.start(vm.name)
        embedded.save(state, hv.export())


def _report(label: str, runs: list[tuple[float, float]]) -> None:
    lat = sorted(r[0] for r in runs)
    rec = sorted(r[1] for r in runs)
    print(f"{label:6} {len(lat)} commits: commit → applied median {statistics.median(lat) * 1000:.0f} ms "
          f"(min {lat[0] * 1000:.0f}, max {lat[-1] * 1000:.0f}); of which reconcile median "
          f"{statistics.median(rec) * 1000:.0f} ms   target < 1000 ms: "
          f"{'met' if statistics.median(lat) < 1.0 else 'NOT met'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commits", type=int, default=15)
    ap.add_argument("--big", type=int, default=1000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmflow-latency-") as d:
        d = Path(d)
        repo = Repo(d / "small")
        repo.commit({"web/web.flow": SMALL}, "two VMs")

        def small_change(i: int) -> str:
            return repo.commit({"web/web.flow": SMALL.replace("cpu    = 2 .. 8", f"cpu    = {3 + i % 4} .. 8")},
                               f"web: {3 + i % 4} vCPUs")

        _report("small", _run(repo, d / "state-small", "web", a.commits, small_change))

        big = Repo(d / "big")
        prog = big.path / "fleet"
        info = write_program(prog, vms=a.big, chains=0, files=20)
        big.commit({}, f"{a.big} VMs")
        _seed(prog, d / "state-big", "fleet")

        def big_change(i: int) -> str:
            k = (i * 37) % a.big
            f = prog / f"part{k % 20:04d}.flow"
            text = f.read_text()
            at = text.index(f"vm web{k} {{")
            j = text.index("cpu    = ", at)
            end = text.index("\n", j)
            new = f"cpu    = {3 + i % 4} .. 8"
            f.write_text(text[:j] + new + text[end:])
            return big.commit({}, f"web{k}: {3 + i % 4} vCPUs")

        _report("big", _run(big, d / "state-big", "fleet", a.commits, big_change))
        print(f"       ({info['vms']:,} VMs, {info['lines']:,} lines in {info['files']} files; one VM changes per "
              f"commit)")


if __name__ == "__main__":
    main()
