"""`make demo`: a guided tour on the embedded default, printed as the commands a user would type.

It validates every example, shows the graph of the web tier, and shows the diagnostics of a deliberately
broken copy of it (made in a temporary folder, so the examples stay valid).
"""

from __future__ import annotations

import os
import shlex
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
    print("\nNext: `vmflow --help`, specs/language.md, and `make test`.")


if __name__ == "__main__":
    main()
