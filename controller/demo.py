"""`make demo`: a guided tour on the embedded default, printed as the commands a user would type.

It validates every example, shows the graph of the web tier and the diagnostics of a deliberately broken
program, then plans and applies the web tier on the embedded default (libvirt's test driver, persisted in
a temporary state folder), changes it, and plans and applies again. The examples themselves stay untouched.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BROKEN = """\
pool rack1 {
  host   = "test:///default"
  cpu    = 8
  memory = 16GiB
}

vm web {
  image  = linux-bse
  pool   = rack1
  cpu    = 2 .. 16
  memory = 4GiB .. 16GiB

  morph grow when cpu > 80% for 5m {
    cpu += 2 max 8
    cooldown 10m
  }
}

vm minimal {
  image  = linux-minimal
  pool   = rack1
  cpu    = 1 .. 4
  memory = 512MiB

  morph grow when cpu > 80% for 5m {
    cpu += 1
    cooldown 10m
  }
}

chain pipeline {
  step upload = image_id_123 {
    out uploaded_image_url
  }
  step detect = image_id_789 {
    in resized_image_url
  }
  upload -> detect -> upload
}
"""


def run(*args: str, cwd: Path = ROOT) -> int:
    shown = " ".join(shlex.quote(a) for a in args)
    print(f"\n\033[1m$ vmflow {shown}\033[0m" if sys.stdout.isatty() else f"\n$ vmflow {shown}", flush=True)
    return subprocess.run([sys.executable, "-m", "controller.cli", *args], cwd=cwd).returncode


def main() -> None:
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    print("vmflow demo: compile the examples, draw one program's graph, and show what an error looks like.")
    code = run("validate", "examples/")
    if code != 0:
        sys.exit(code)
    run("graph", "examples/web", "--format", "mermaid")
    run("images", "--role", "inference")
    with tempfile.TemporaryDirectory(prefix="vmflow-demo-") as d:
        broken = Path(d) / "broken"
        broken.mkdir()
        (broken / "web.flow").write_text(BROKEN)
        print("\nA broken program (a typo in an image name, a bound beyond the image and the pool, a morph"
              "\nthe image cannot do, a chain with a cycle): every problem at once, sorted.")
        code = run("validate", str(broken), cwd=Path(d))
        print(f"(exit code {code}: 1 means the program has errors)")
    run("explain", "F304")
    with tempfile.TemporaryDirectory(prefix="vmflow-demo-") as d:
        web = Path(d) / "web"
        shutil.copytree(ROOT / "examples" / "web", web)
        print("\nPlan and apply on the embedded default: libvirt's test driver, its state kept in web/.vmflow/.")
        run("plan", "web", cwd=Path(d))
        run("apply", "web", "--auto-approve", cwd=Path(d))
        run("plan", "web", cwd=Path(d))
        flow = web / "web.flow"
        flow.write_text(flow.read_text().replace("cpu    = 2 .. 8", "cpu    = 4 .. 8", 1)
                        .replace("memory = 4GiB .. 16GiB", "memory = 4GiB .. 12GiB", 1))
        print("\nweb.flow now starts `web` with 4 vCPUs and lowers its memory bound to 12GiB; a bound is the"
              "\nhypervisor's maximum, which cannot change while the VM runs, so this change restarts it:")
        run("plan", "web", cwd=Path(d))
        run("apply", "web", "--auto-approve", cwd=Path(d))
    print("\nNext: `vmflow --help`, specs/language.md, specs/plan.md, and `make test`.")


if __name__ == "__main__":
    main()
