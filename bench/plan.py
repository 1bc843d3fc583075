"""Observe + plan on libvirt's test driver, for 1,000 and 10,000 VMs.

    python bench/plan.py [--sizes 1000 10000] [--runs 3]

For each size: a node file holding that many vmflow-owned domains (defined through the real test driver,
then persisted the way the embedded default persists them), then a no-change run of what `vmflow plan`
does after compiling: open the connection, observe every domain in one pass, plan. Reports the median time
per size and the ratio between sizes (linear growth means the ratio follows the sizes).
Target: 10,000 VMs in under 2 s. For scale: Terraform's no-change plan of 5,000 trivial resources takes
about 48 s on this machine class (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller import domain_xml, embedded  # noqa: E402
from controller.hypervisor import Hypervisor  # noqa: E402
from controller.plan import Options, plan  # noqa: E402
from controller.state import NicState, Ownership, VmState  # noqa: E402


def desired(n: int) -> dict[str, VmState]:
    return {f"web{i}": VmState(f"web{i}", "linux-base", 2, 8, 2 * 1024 * 1024, 8 * 1024 * 1024, (),
                               (NicState("lan", "default", None, "virtio"),),
                               owner=Ownership("bench", f"vm.web{i}", None), pool="rack1")
            for i in range(n)}


def seed(state_dir: Path, want: dict[str, VmState]) -> None:
    with Hypervisor(embedded.uri(state_dir)) as hv:
        for vm in want.values():
            hv.define(domain_xml.render(vm))
        embedded.save(state_dir, hv.export())


def once(state_dir: Path, want: dict[str, VmState]) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    with Hypervisor(embedded.uri(state_dir)) as hv:
        t1 = time.perf_counter()
        actual = hv.observe(snapshots=False)
        t2 = time.perf_counter()
    p = plan(want, actual, Options(device_hotplug=False))
    t3 = time.perf_counter()
    assert len(p.changes) == len(want)
    return t1 - t0, t2 - t1, t3 - t2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    results = {}
    for n in a.sizes:
        want = desired(n)
        with tempfile.TemporaryDirectory(prefix="vmflow-plan-bench-") as d:
            seed(Path(d), want)
            runs = [once(Path(d), want) for _ in range(a.runs)]
        total = statistics.median(sum(r) for r in runs)
        results[n] = total
        conn, obs, pl = (statistics.median(r[i] for r in runs) for i in range(3))
        print(f"{n:>6,} VMs: {total:.3f} s (open {conn:.3f} s: the test driver reads its node file; "
              f"observe {obs:.3f} s; plan {pl:.3f} s), median of {a.runs}")
    if len(results) > 1:
        (n1, t1), (n2, t2) = sorted(results.items())[0], sorted(results.items())[-1]
        print(f"growth: {n2 / n1:.0f}x the VMs took {t2 / t1:.1f}x the time   (target: 10,000 VMs under 2 s)")


if __name__ == "__main__":
    main()
