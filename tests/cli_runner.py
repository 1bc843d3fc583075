"""What the end-to-end tests share: running the real `vmflow` command, and a small two-VM program."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Two VMs on the embedded default: one with a NIC and room to grow, one small.
TWO_VMS = """\
pool rack1 {
  host   = "test:///default"
  cpu    = 64
  memory = 256GiB
}

vm web {
  image  = linux-base
  pool   = rack1
  cpu    = 2 .. 8
  memory = 2GiB .. 8GiB

  nic lan {
    network = "default"
  }
}

vm api {
  image  = linux-base
  pool   = rack1
  cpu    = 1 .. 4
  memory = 1GiB .. 4GiB
}
"""


def vmflow(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `vmflow ARGS` as a user would (a new process, no colour) and capture what it says."""
    e = dict(os.environ, NO_COLOR="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "controller.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=e, timeout=timeout)
