"""Generate large, valid programs for the benchmarks: VMs with morph rules, and chains.

`write_program(dir, vms, chains, files)` writes a program spread over `files` files, plus an equivalent
HCL document (for python-hcl2, the peer parser) when asked. Each VM is about 14 lines, each chain about 20.
"""

from __future__ import annotations

from pathlib import Path

POOLS = 8


def pool_block(i: int) -> str:
    return f"""pool rack{i} {{
  host   = "test:///default"
  cpu    = 100000
  memory = 100000GiB
}}
"""


def vm_block(i: int) -> str:
    return f"""vm web{i} {{
  image  = linux-base
  pool   = rack{i % POOLS}
  cpu    = 2 .. 8
  memory = 2GiB .. 8GiB
  health = agent
  disk data {{
    size = 20GiB
  }}
  morph grow when cpu > 80% for 5m {{
    cpu += 2 max 8
    cooldown 10m
  }}
}}
"""


def chain_block(i: int) -> str:
    return f"""chain pipeline{i} {{
  retry   = 3
  backoff = 10s
  timeout = 30m

  step upload = image_id_123 {{
    out uploaded_image_url
  }}
  step resize = image_id_456 {{
    in  uploaded_image_url
    out resized_image_url
    timeout = 5m
  }}
  step detect = image_id_789 {{
    in  resized_image_url
    out detected_objects
    replicas = 1 .. 4
  }}
  upload -> resize -> detect
}}
"""


def hcl_vm_block(i: int) -> str:
    """The same VM as an HCL resource, line for line (for the peer parser)."""
    return f"""resource "vm" "web{i}" {{
  image  = "linux-base"
  pool   = "rack{i % POOLS}"
  cpu    = [2, 8]
  memory = ["2GiB", "8GiB"]
  health = "agent"
  disk "data" {{
    size = "20GiB"
  }}
  morph "grow" {{
    when     = "cpu > 80% for 5m"
    cpu_add  = 2
    cooldown = "10m"
  }}
}}
"""


def write_program(out: Path, vms: int, chains: int, files: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.flow"):
        old.unlink()
    buckets: list[list[str]] = [[] for _ in range(files)]
    buckets[0].extend(pool_block(i) for i in range(POOLS))
    for i in range(vms):
        buckets[i % files].append(vm_block(i))
    for i in range(chains):
        buckets[(vms + i) % files].append(chain_block(i))
    lines = 0
    for n, blocks in enumerate(buckets):
        text = "\n".join(blocks)
        lines += text.count("\n") + 1
        (out / f"part{n:04d}.flow").write_text(text)
    return {"files": files, "lines": lines, "vms": vms, "chains": chains}


def hcl_document(vms: int) -> str:
    return "\n".join(hcl_vm_block(i) for i in range(vms))
