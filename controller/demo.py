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
    controller_tour()
    print("\nNext: `vmflow --help`, specs/language.md, specs/plan.md, specs/controller.md, and `make test`.")


def _git(repo: Path, *args: str) -> str:
    env = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", HOME=str(repo.parent), GIT_AUTHOR_NAME="Demo",
               GIT_AUTHOR_EMAIL="demo@example.com", GIT_COMMITTER_NAME="Demo", GIT_COMMITTER_EMAIL="demo@example.com")
    print(f"$ git {' '.join(shlex.quote(a) for a in args)}", flush=True)
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout


def _applied(state: Path, sha: str, timeout: float = 30.0) -> bool:
    import time

    from controller.store import Store

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (state / "vmflow.db").exists():
            store = Store(state / "vmflow.db")
            doc = store.get_status("web") or {}
            store.close()
            if (doc.get("revisions") or {}).get("last_applied") == sha:
                return True
        time.sleep(0.1)
    return False


def controller_tour() -> None:
    """The main job: a controller watching a git repository, applying each commit as it lands."""
    with tempfile.TemporaryDirectory(prefix="vmflow-demo-git-") as d:
        repo = Path(d) / "infra"
        shutil.copytree(ROOT / "examples" / "web", repo / "web")
        state = Path(d) / "state"
        print("\nThe controller: a git repository holding the web tier, watched by `vmflow controller` on the"
              "\nembedded default. Each commit is compiled from git, planned and applied within a second.")
        _git(repo, "init", "-q", "-b", "main")
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "-m", "web tier")
        first = _git(repo, "rev-parse", "HEAD").strip()
        cmd = [sys.executable, "-m", "controller.cli", "controller", "--repo", str(repo), "--path", "web",
               "--state-dir", str(state), "--listen", "off", "--resync", "3600"]
        print(f"$ vmflow controller --repo {repo.name} --path web --state-dir state &", flush=True)
        proc = subprocess.Popen(cmd, cwd=d)
        try:
            if not _applied(state, first):
                print("the controller did not apply the first revision", file=sys.stderr)
                sys.exit(1)
            flow = repo / "web" / "web.flow"
            flow.write_text(flow.read_text().replace("cpu    = 2 .. 8", "cpu    = 4 .. 8", 1))
            print("\nweb.flow now starts `web` with 4 vCPUs; commit it and the controller applies it:")
            _git(repo, "commit", "-q", "-am", "web: 4 vCPUs")
            second = _git(repo, "rev-parse", "HEAD").strip()
            if not _applied(state, second):
                print("the controller did not apply the change", file=sys.stderr)
                sys.exit(1)
        finally:
            proc.terminate()
            proc.wait(30)
        run("status", "--state-dir", "state", cwd=Path(d))
        run("history", "--state-dir", "state", cwd=Path(d))


if __name__ == "__main__":
    main()
