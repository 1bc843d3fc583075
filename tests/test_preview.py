"""Pull-request previews (`vmflow plan --base REF`): real git repositories built in a temporary folder, the real
`vmflow` command, and golden snapshots of what it prints.

Snapshots are under tests/golden/preview/: `pull-request.{md,txt,json}` (a pull request that changes a cpu,
adds a VM, removes one, changes a morph rule, adds a chain step and swaps an image), `syntax-error.md` (a head
that does not parse) and `new-program.md` (a program the pull request adds). Commit hashes are replaced by
`{base}` and `{head}` (and `{base_sha}`/`{head_sha}` in full) before comparing, and commits have fixed dates and
authors besides. `VMFLOW_BLESS=1` rewrites the snapshots.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from cli_runner import vmflow
from test_golden import check_snapshot

from compiler.program import Compiler
from controller import preview as pv
from controller.render_plan import MARKDOWN_BREAK

GOLDEN = Path(__file__).resolve().parent / "golden" / "preview"
PROGRAM = "apps/shop"
MARKER = "<!-- vmflow-preview program=shop path=apps/shop -->"
FENCE = re.compile(r"^(`{3,})(.*)$")

BASE = """\
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
  health = app("nginx") running

  nic lan {
    network = "default"
  }

  morph grow when cpu > 80% for 5m {
    cpu += 2 max 8
    cooldown 10m
  }
}

vm api {
  image  = linux-base
  pool   = rack1
  cpu    = 1 .. 4
  memory = 2GiB .. 4GiB
}

vm old {
  image  = linux-base
  pool   = rack1
  cpu    = 1 .. 2
  memory = 1GiB .. 2GiB
}
"""

CHAIN = """\
chain thumbnails {
  step upload = image_id_123 {
    out uploaded_image_url
  }
  step resize = image_id_456 {
    in uploaded_image_url
    out resized_image_url
  }

  upload -> resize
}
"""

# The pull request: web's cpu 2 -> 4 (live) and its morph rule fires later, api swaps its image (restart), cache is
# added, old removed, the chain gains a step. api now comes before web: a moved block is no change.
HEAD = """\
pool rack1 {
  host   = "test:///default"
  cpu    = 64
  memory = 256GiB
}

vm api {
  image  = linux-base-large
  pool   = rack1
  cpu    = 1 .. 4
  memory = 2GiB .. 4GiB
}

vm web {
  image  = linux-base
  pool   = rack1
  cpu    = 4 .. 8
  memory = 2GiB .. 8GiB
  health = app("nginx") running

  nic lan {
    network = "default"
  }

  morph grow when cpu > 90% for 5m {
    cpu += 2 max 8
    cooldown 15m
  }
}

vm cache {
  image  = linux-base
  pool   = rack1
  cpu    = 2
  memory = 2GiB
}
"""

HEAD_CHAIN = CHAIN.replace("""
  upload -> resize
""", """  step detect = image_id_789 {
    in resized_image_url
    out detected_objects
  }

  upload -> resize -> detect
""")


# ------------------------------------------------------------------------------------------ git


class Repo:
    """A git repository in a temporary folder, driven with the git command line, isolated from the user's
    configuration, with fixed authors and dates so that commit hashes do not depend on when the test runs."""

    def __init__(self, root: Path, home: Path) -> None:
        self.root = root
        self.env = {"HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "Ada", "GIT_AUTHOR_EMAIL":
                    "ada@example.com", "GIT_COMMITTER_NAME": "Ada", "GIT_COMMITTER_EMAIL": "ada@example.com",
                    "PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C"}
        self.commits = 0
        root.mkdir(parents=True)
        self.git("init", "-q", "-b", "main")
        self.git("config", "user.name", "Ada")
        self.git("config", "user.email", "ada@example.com")
        self.git("config", "commit.gpgsign", "false")

    def git(self, *args: str) -> str:
        r = subprocess.run(["git", *args], cwd=self.root, env=self.env, capture_output=True, text=True, timeout=30,
                           check=False)
        assert r.returncode == 0, f"git {' '.join(args)}: {r.stderr}"
        return r.stdout.strip()

    def commit(self, files: dict[str, str | None], message: str) -> str:
        """Write (or, for None, delete) files and commit them all; returns the commit's hash."""
        for name, text in files.items():
            f = self.root / name
            if text is None:
                f.unlink()
            else:
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(text)
        self.git("add", "-A")
        self.commits += 1
        date = f"2024-01-0{self.commits}T12:00:00+00:00"
        self.env.update(GIT_AUTHOR_DATE=date, GIT_COMMITTER_DATE=date)
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.git("rev-parse", "HEAD")

    def run(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return vmflow(*args, cwd=cwd or self.root, env={"HOME": self.env["HOME"]})


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return Repo(tmp_path / "repo", tmp_path)


@pytest.fixture(scope="module")
def pull_request(tmp_path_factory) -> tuple[Repo, str, str]:
    """A repository with `main` at the base and the branch `change` at the head of the pull request."""
    tmp = tmp_path_factory.mktemp("preview")
    r = Repo(tmp / "repo", tmp)
    r.commit({"README.md": "infra\n"}, "Start")
    base = r.commit({f"{PROGRAM}/main.flow": BASE, f"{PROGRAM}/chain.flow": CHAIN}, "The shop")
    r.git("checkout", "-q", "-b", "change")
    head = r.commit({f"{PROGRAM}/main.flow": HEAD, f"{PROGRAM}/chain.flow": HEAD_CHAIN}, "Grow the shop")
    return r, base, head


def placeholders(text: str, **shas: str) -> str:
    """Commit hashes, full or abbreviated, replaced by `{name_sha}` / `{name}`."""
    for name, sha in shas.items():
        text = text.replace(sha, "{" + name + "_sha}")
        text = re.sub(rf"\b{sha[:7]}[0-9a-f]*\b", "{" + name + "}", text)
    return text


def check_body(body: str, max_chars: int, part: int) -> None:
    """One comment body: under the limit, its marker first, every fence and <details> closed."""
    assert len(body) <= max_chars, f"part {part} has {len(body)} characters"
    lines = body.split("\n")
    want = MARKER if part == 1 else MARKER.replace(" -->", f" part={part} -->")
    assert lines[0] == want
    fence, details = None, 0
    for line in lines:
        if fence is None:
            f = FENCE.match(line)
            if f:
                assert "`" not in f[2], f"{line!r} is not a fence"
                fence = f[1]
            details += line.count("<details") - line.count("</details>")
            assert details in (0, 1)
        elif re.fullmatch(rf"{fence}`*\s*", line):
            fence = None
    assert fence is None and details == 0, f"part {part} ends inside a block"


# ------------------------------------------------------------------------------------------ golden, end to end


@pytest.fixture(scope="module")
def pull_request_output(pull_request) -> dict[str, subprocess.CompletedProcess]:
    """`vmflow plan --base main --head change` in each format, run once for the tests below."""
    r, _, _ = pull_request
    return {fmt: r.run("plan", PROGRAM, "--base", "main", "--head", "change", "--format", fmt)
            for fmt in ("markdown", "text", "json")}


@pytest.mark.parametrize("fmt,ext", [("markdown", "md"), ("text", "txt"), ("json", "json")])
def test_pull_request_snapshot(pull_request, pull_request_output, fmt: str, ext: str) -> None:
    _, base, head = pull_request
    out = pull_request_output[fmt]
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    check_snapshot(GOLDEN / f"pull-request.{ext}", placeholders(out.stdout, base=base, head=head))


def test_pull_request_markdown(pull_request, pull_request_output) -> None:
    _, base, head = pull_request
    out = pull_request_output["markdown"]
    assert out.returncode == 2
    bodies = out.stdout.split(f"\n{MARKDOWN_BREAK}\n")
    assert len(bodies) == 1
    body = bodies[0]
    check_body(body, 65536, 1)
    summary = body.split("\n")[1]
    assert summary == (f"**vmflow** `shop`: 1 to add, 2 to change (1 live, 1 restart), 1 to destroy · 1 morph rule "
                       f"changed · 1 chain step added · 1 chain edge added · base {base[:7]} → head {head[:7]}")
    assert "| `vm.api` | `~!` update with restart | `image` |" in body
    assert "| `vm.web` | `~` update live | `cpu-live` |" in body
    assert "| `vm.cache` | `+` create | `not-found` |" in body
    assert "| `vm.old` | `-` destroy | `removed-from-program` |" in body
    assert "deleted only by `vmflow apply --prune`: `vm.old`" in body
    assert "| `morph.web.grow` | `~` changed | `cooldown`, `when` |" in body
    assert "+ when     = cpu > 90% for 5m" in body
    assert "| `chain.thumbnails.step.detect` | `+` added |" in body
    # The health check and the pool did not change, and moving vm api is no change either.
    assert "pool.rack1`" not in body.split("#### Graph")[0]
    mermaid = body.split("```mermaid\n")[1].split("```")[0]
    assert re.search(r"class (n\d+,)*n\d+ added", mermaid) and "classDef removed" in mermaid


def test_head_that_does_not_parse(repo: Repo) -> None:
    base = repo.commit({f"{PROGRAM}/main.flow": BASE}, "The shop")
    broken = BASE.replace("  cpu    = 1 .. 4\n", "  cpu    = 1 .. \n")
    head = repo.commit({f"{PROGRAM}/main.flow": broken}, "Oops")
    out = repo.run("plan", PROGRAM, "--base", "HEAD~1", "--format", "markdown")
    assert out.returncode == 1
    assert out.stdout.split("\n")[0] == MARKER
    assert "does not compile" in out.stdout and "error[F1" in out.stdout
    assert f"{PROGRAM}/main.flow:" in out.stdout, "diagnostics name repository-relative files"
    assert out.stderr.strip().count("\n") == 0 and "does not compile" in out.stderr
    check_snapshot(GOLDEN / "syntax-error.md", placeholders(out.stdout, base=base, head=head))
    out = repo.run("plan", PROGRAM, "--base", "HEAD~1", "--format", "json")
    doc = json.loads(out.stdout)
    assert out.returncode == 1 and doc["ok"] is False and doc["head"]["state"] == "invalid"
    assert doc["diagnostics"][0]["severity"] == "error"


def test_new_program(repo: Repo) -> None:
    base = repo.commit({"README.md": "infra\n"}, "Start")
    head = repo.commit({f"{PROGRAM}/main.flow": BASE, f"{PROGRAM}/chain.flow": CHAIN}, "The shop")
    out = repo.run("plan", PROGRAM, "--base", "main~1", "--format", "markdown")
    assert out.returncode == 2, out.stderr
    assert out.stdout.startswith(MARKER + "\n")
    assert "The program is new" in out.stdout
    assert "3 to add" in out.stdout and "1 chain added" in out.stdout and "2 chain steps added" in out.stdout
    check_snapshot(GOLDEN / "new-program.md", placeholders(out.stdout, base=base, head=head))


def test_base_that_does_not_compile(repo: Repo) -> None:
    repo.commit({f"{PROGRAM}/main.flow": "vm web {\n  image = \n}\n"}, "Broken")
    repo.commit({f"{PROGRAM}/main.flow": BASE}, "Fixed")
    out = repo.run("plan", PROGRAM, "--base", "HEAD~1")
    assert out.returncode == 2, out.stderr
    assert "does not compile at base" in out.stdout and "3 to add" in out.stdout


def test_no_changes_when_blocks_move_and_files_are_reformatted(repo: Repo) -> None:
    repo.commit({f"{PROGRAM}/main.flow": BASE, f"{PROGRAM}/chain.flow": CHAIN}, "The shop")
    # The chain moves into main.flow, squashed onto fewer lines, and the VMs change places.
    web, rest = BASE.split("vm api {")
    moved = "# moved around\n" + CHAIN.replace("\n\n", "\n") + "vm api {" + rest + "\n" + web
    repo.commit({f"{PROGRAM}/main.flow": moved, f"{PROGRAM}/chain.flow": None}, "Move things")
    out = repo.run("plan", PROGRAM, "--base", "HEAD~1", "--format", "markdown")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "No changes" in out.stdout and "<details" not in out.stdout and "mermaid" not in out.stdout


def test_unknown_ref_is_one_line(pull_request) -> None:
    r, _, _ = pull_request
    out = r.run("plan", PROGRAM, "--base", "no-such-branch")
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr.startswith("error: unknown revision `no-such-branch`")
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    out = r.run("plan", PROGRAM, "--base", "main", "--head", "nope~3")
    assert out.returncode == 1 and "`nope~3`" in out.stderr and out.stderr.strip().count("\n") == 0


def test_head_defaults_to_the_committed_head(pull_request) -> None:
    r, base, head = pull_request
    (r.root / PROGRAM / "main.flow").write_text(HEAD.replace("cpu    = 4 .. 8", "cpu    = 6 .. 8"))
    try:
        out = r.run("plan", PROGRAM, "--base", "main", "--format", "json")
    finally:
        r.git("checkout", "-q", "--", PROGRAM)
    doc = json.loads(out.stdout)
    assert doc["head"]["ref"] == "HEAD" and doc["head"]["sha"] == head and doc["base"]["sha"] == base
    web = next(c for c in doc["vms"] if c["address"] == "vm.web")
    assert web["after"]["cpu"] == 4, "the working tree is not read"


def test_program_folder_given_from_inside_it(pull_request) -> None:
    r, _, _ = pull_request
    out = r.run("plan", "--base", "main", "--head", "change", "--format", "markdown", cwd=r.root / PROGRAM)
    assert out.returncode == 2, out.stderr
    assert out.stdout.split("\n")[0] == MARKER


def test_command_line_mistakes(pull_request, tmp_path: Path) -> None:
    r, _, _ = pull_request
    out = r.run("plan", PROGRAM, "--head", "change")
    assert out.returncode == 64 and "--head goes with --base" in out.stderr
    out = r.run("plan", PROGRAM, "--base", "main", "-o", str(tmp_path / "p.json"))
    assert out.returncode == 64 and "--out" in out.stderr
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "main.flow").write_text(BASE)
    out = vmflow("plan", "loose", "--base", "main", cwd=tmp_path, env={"HOME": str(tmp_path)})
    assert out.returncode == 1 and "not in a git repository" in out.stderr


def test_live_plan_at_head(pull_request, tmp_path: Path) -> None:
    r, _, _ = pull_request
    out = r.run("plan", PROGRAM, "--base", "main", "--head", "change", "--format", "markdown",
                "--libvirt", "test:///default", "--state-dir", str(tmp_path / "state"))
    assert out.returncode == 2, out.stderr
    body = out.stdout
    live = body.split("### Live plan at head: `test:///default`\n")[1]
    assert "**Plan: 3 to add, 0 to change (0 live, 0 restart), 0 to replace, 0 to destroy.**" in live
    assert "| `vm.cache` | `+` create | `not-found` |" in live
    out = r.run("plan", PROGRAM, "--base", "main", "--head", "change", "--format", "json",
                "--libvirt", "test:///default", "--state-dir", str(tmp_path / "state"))
    doc = json.loads(out.stdout)
    assert doc["live"]["uri"] == "test:///default" and doc["live"]["summary"]["create"] == 3


# ------------------------------------------------------------------------------------------ splitting


def _many_vms(n: int, cpu: str) -> str:
    return "".join(f"vm node{i:03d} {{\n  image  = linux-base\n  cpu    = {cpu}\n  memory = 1GiB .. 2GiB\n"
                   f"  disk data {{\n    size = {i + 1}GiB\n  }}\n}}\n\n" for i in range(n))


def test_a_long_preview_is_several_comments(repo: Repo) -> None:
    repo.commit({f"{PROGRAM}/main.flow": _many_vms(250, "1 .. 4")}, "Many")
    repo.commit({f"{PROGRAM}/main.flow": _many_vms(250, "2 .. 6")}, "Many, bigger")
    out = repo.run("plan", PROGRAM, "--base", "HEAD~1", "--format", "markdown")
    assert out.returncode == 2, out.stderr
    bodies = out.stdout.split(f"\n{MARKDOWN_BREAK}\n")
    assert len(bodies) > 1
    for i, body in enumerate(bodies, 1):
        check_body(body, 65536, i)
        assert f"· part {i} of {len(bodies)}" in body.split("\n")[1]
    text = "\n".join(bodies)
    for i in range(250):
        assert f"| `vm.node{i:03d}` | `~!` update with restart | `cpu-max` |" in text
        assert f"<b>vm.node{i:03d}</b>" in text
    assert text.count("#### Graph") == 1


def test_split_bodies_stay_valid_at_any_limit() -> None:
    p = _library_preview()
    for limit in (1000, 1500, 3000, 65536):
        bodies = pv.render_markdown(p, max_chars=limit)
        assert (len(bodies) == 1) == (limit == 65536)
        for i, body in enumerate(bodies, 1):
            check_body(body, limit, i)
        text = "\n".join(bodies)
        for c in p.plan.actionable:
            assert f"<b>{c.address}</b>" in text
        for b in p.changes:
            assert f"<b>{b.address.replace('>', '&gt;')}</b>" in text
    with pytest.raises(ValueError, match="at least"):
        pv.render_markdown(p, max_chars=999)


# ------------------------------------------------------------------------------------------ the library


def _compile(tmp_path: Path, name: str, files: dict[str, str]):
    d = tmp_path / name
    d.mkdir()
    for f, text in files.items():
        (d / f).write_text(text)
    return Compiler().compile_path(d)


def _library_preview(tmp_path: Path | None = None) -> pv.Preview:
    import tempfile

    tmp = tmp_path or Path(tempfile.mkdtemp())
    base = _compile(tmp, "base", {"main.flow": BASE, "chain.flow": CHAIN})
    head = _compile(tmp, "head", {"main.flow": HEAD, "chain.flow": HEAD_CHAIN})
    return pv.preview(base, head, "shop", base_rev=pv.Revision("main", "a" * 40, "aaaaaaa"),
                      head_rev=pv.Revision("HEAD", "b" * 40, "bbbbbbb"), path=PROGRAM)


def test_vm_changes_are_the_planners(tmp_path: Path) -> None:
    p = _library_preview(tmp_path)
    got = {c.address: (c.action.value, [r.value for r in c.reasons]) for c in p.plan.actionable}
    assert got == {"vm.api": ("update-restart", ["image"]), "vm.cache": ("create", ["not-found"]),
                   "vm.old": ("delete", ["removed-from-program"]), "vm.web": ("update-live", ["cpu-live"])}
    assert not p.plan.drift, "the synthesized base is as apply left it: no drift"


def test_block_changes(tmp_path: Path) -> None:
    p = _library_preview(tmp_path)
    got = {(b.address, b.change, b.paths) for b in p.changes}
    assert got == {("morph.web.grow", "changed", ("cooldown", "when")),
                   ("chain.thumbnails.step.detect", "added", ("image", "inputs", "outputs")),
                   ("chain.thumbnails.step.resize -> chain.thumbnails.step.detect", "added", ("data",))}


def test_the_graph_is_the_changed_part(tmp_path: Path) -> None:
    p = _library_preview(tmp_path)
    assert p.marks["vm.old"] == "removed" and p.marks["vm.cache"] == "added" and p.marks["vm.api"] == "changed"
    assert "vm.old" in p.graph and "pool.rack1" in p.graph, "removed nodes and neighbours are drawn"
    assert "chain.thumbnails.step.upload" not in p.graph, "not a direct neighbour of a change"
    mermaid = pv.to_mermaid(p)
    ids = dict(re.findall(r'^  (n\d+)\W*"([^"]+)"', mermaid, re.MULTILINE))
    old = next(i for i, a in ids.items() if a == "vm.old")
    assert re.search(rf"^  class (n\d+,)*{old}(,n\d+)* removed$", mermaid, re.MULTILINE)
    assert "linkStyle" in mermaid


def test_health_and_pool_changes_are_blocks(tmp_path: Path) -> None:
    base = _compile(tmp_path, "base", {"main.flow": BASE})
    head = _compile(tmp_path, "head", {"main.flow": BASE.replace('app("nginx") running', "port(80)")
                                       .replace("cpu    = 64", "cpu    = 48")})
    p = pv.preview(base, head, "shop")
    assert [(b.address, b.kind, b.before, b.after) for b in p.changes] == [
        ("pool.rack1", "pool", {"host": "test:///default", "cpu": 64, "memory": "256GiB", "disk": None},
         {"host": "test:///default", "cpu": 48, "memory": "256GiB", "disk": None}),
        ("vm.web", "vm", {"health": 'app("nginx") running'}, {"health": "port(80)"})]
    assert not p.plan.actionable
    assert pv.summary(p) == "0 to add, 0 to change (0 live, 0 restart), 0 to destroy · 1 pool changed · " \
                            "1 health check changed"


def test_a_base_that_is_missing_adds_everything(tmp_path: Path) -> None:
    head = _compile(tmp_path, "head", {"main.flow": HEAD, "chain.flow": HEAD_CHAIN})
    p = pv.preview(None, head, "shop")
    assert p.base_state == "missing"
    assert {c.action.value for c in p.plan.actionable} == {"create"}
    assert {b.change for b in p.changes} == {"added"}
    assert all(m == "added" for m in p.marks.values())


def test_marker_names_program_and_folder() -> None:
    p = pv.Preview("a b-->c", "ok", None, (), None, {}, {}, path="x/y")
    assert pv.marker(p) == "<!-- vmflow-preview program=a%20b--%3Ec path=x/y -->"
    assert pv.marker(p, 3).endswith(" part=3 -->")


def test_json_shape(tmp_path: Path) -> None:
    doc = pv.to_json(_library_preview(tmp_path))
    assert set(doc) == {"format_version", "program", "path", "base", "head", "ok", "changed", "summary", "vms",
                        "problems", "blocks", "graph", "diagnostics", "live"}
    assert doc["format_version"] == pv.FORMAT_VERSION and doc["path"] == PROGRAM
    assert doc["summary"]["blocks"] == {"morph": {"added": 0, "changed": 1, "removed": 0},
                                        "step": {"added": 1, "changed": 0, "removed": 0},
                                        "edge": {"added": 1, "changed": 0, "removed": 0}}
    old = next(v for v in doc["vms"] if v["address"] == "vm.old")
    assert old["note"] == "needs --prune" and old["after"] is None
    json.dumps(doc)  # plain data
