"""The git source against real repositories made with the `git` command: revisions compiled from git objects,
remotes mirrored through `file://`, damage and unreachable remotes as typed errors, and OpenPGP signatures
checked against a folder of trusted keys."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import watchfiles

from compiler import program as program_module
from compiler.program import Compiler
from controller.gitsource import GitError, GitSource, GitTree
from tests.gitrepo import Keys, Repo

WEB = """\
import "../../shared"

vm web {
  image  = linux-base
  pool   = rack1
  cpu    = 2 .. {bound}
  memory = 4GiB .. 16GiB
}
"""
POOLS = """\
pool rack1 {
  cpu    = 32
  memory = 128GiB
}
"""
IMAGE = """\
id: custom
os: debian-12
source: {{path: custom.qcow2}}
resources:
  cpu: {{min: 1, max: {max}}}
  memory: {{min: 512MiB, max: 16GiB}}
capabilities: [cpu_hotplug, memory_balloon, guest_agent]
"""


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No configuration of the machine or the user reaches git or gpg."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.delenv("GIT_CONFIG_GLOBAL", raising=False)
    monkeypatch.delenv("GNUPGHOME", raising=False)
    monkeypatch.setenv("VMFLOW_NO_FORK", "1")
    monkeypatch.delenv("VMFLOW_IMAGES", raising=False)


def git(cwd: Path, *args: str, env: dict | None = None) -> str:
    run = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, check=False)
    assert run.returncode == 0, f"git {' '.join(args)}: {run.stderr}"
    return run.stdout.strip()


@pytest.fixture
def repo(tmp_path) -> Repo:
    return Repo(tmp_path / "infra", user=("Tess Ter", "tess@example.com"))


def web_program(bound: int = 8) -> dict[str, str]:
    return {"apps/web/main.flow": WEB.replace("{bound}", str(bound)), "shared/pools.flow": POOLS}


def codes(comp) -> list[str]:
    return [d.code for d in comp.diagnostics]


# ------------------------------------------------------------------------------------------ compiling revisions


def test_compile_two_revisions_and_a_syntax_error(repo):
    first = repo.commit(web_program(8), "first")
    second = repo.commit(web_program(12), "second")
    broken = repo.commit({"apps/web/main.flow": "vm web {\n  image = linux-base\n  cpu = = 2\n}\n"}, "broken")
    with GitSource(str(repo.path), path="apps/web") as source:
        compiler = Compiler()
        a = source.compile(compiler, first)
        b = source.compile(compiler, second)
        assert a.ok and b.ok, a.diagnostics + b.diagnostics
        assert a.program.vms["web"].cpu.bound == 8 and b.program.vms["web"].cpu.bound == 12
        assert a.files == ["apps/web/main.flow", "shared/pools.flow"] and a.root == "apps/web"
        c = source.compile(compiler, broken)
        assert not c.ok
        [d] = c.diagnostics
        assert d.span.file == "apps/web/main.flow"
        assert c.sources[d.span.file].line_col(d.span.start)[0] == 3
        # The broken revision is where the branch is; earlier revisions stay readable by any name.
        assert source.head() == broken == source.resolve("main")
        assert source.resolve("HEAD~1") == second and source.resolve(first[:8]) == first


def test_imports_across_folders_follow_the_revision(repo):
    first = repo.commit(web_program(), "with pools")
    gone = repo.commit({"shared/pools.flow": None, "shared/other.flow": POOLS}, "pools renamed")
    nothing = repo.commit({"shared/other.flow": None, "shared/keep.txt": "x"}, "pools removed")
    with GitSource(str(repo.path), path="apps/web") as source:
        compiler = Compiler()
        assert source.compile(compiler, first).ok
        moved = source.compile(compiler, gone)
        assert moved.ok and moved.files == ["apps/web/main.flow", "shared/other.flow"]
        missing = source.compile(compiler, nothing)
        assert codes(missing) == ["F201"]  # the folder is there but holds no pools: `rack1` is unknown


def test_import_outside_the_repository(repo):
    program = web_program()
    program["apps/web/main.flow"] = program["apps/web/main.flow"].replace("../../shared", "../../../elsewhere")
    sha = repo.commit(program)
    with GitSource(str(repo.path), path="apps/web") as source:
        comp = source.compile(Compiler(), sha)
    [d] = comp.diagnostics
    assert d.code == "F212" and d.span.file == "apps/web/main.flow"
    assert comp.sources[d.span.file].line_col(d.span.start) == (1, 8)
    assert d.message == f"import `../../../elsewhere` points outside the repository at revision {sha[:7]}"


def test_image_schemas_come_from_the_revision(repo):
    program = web_program()
    program["apps/web/main.flow"] = program["apps/web/main.flow"].replace("linux-base", "custom")
    small = repo.commit({**program, "apps/web/images/custom.yaml": IMAGE.format(max=4)}, "small image")
    large = repo.commit({"apps/web/images/custom.yaml": IMAGE.format(max=16)}, "large image")
    with GitSource(str(repo.path), path="apps/web") as source:
        compiler = Compiler()
        for _ in range(2):  # the second round is served from caches: they must keep the revisions apart
            too_big = source.compile(compiler, small)
            [d] = too_big.diagnostics
            assert d.code == "F302" and d.span.file == "apps/web/main.flow"
            assert [label.span.file for label in d.labels] == ["apps/web/images/custom.yaml"]
            assert too_big.catalog.get("custom").path == "apps/web/images/custom.yaml"
            fits = source.compile(compiler, large)
            assert fits.ok and fits.catalog.get("custom").cpu_max == 16
            assert fits.catalog.get("linux-base") is not None  # the built-in catalog still follows


def test_a_new_revision_reparses_only_the_changed_file(repo, monkeypatch):
    files = {f"apps/web/vm{i}.flow": f"vm v{i} {{\n  image = linux-base\n  cpu = 1 .. 2\n  memory = 1GiB\n}}\n"
             for i in range(20)}
    first = repo.commit(files, "twenty")
    second = repo.commit({"apps/web/vm7.flow": files["apps/web/vm7.flow"].replace("1 .. 2", "1 .. 4")}, "one")
    parsed = []
    real = program_module._parse_one
    monkeypatch.setattr(program_module, "_parse_one", lambda key, name, text: parsed.append(name) or
                        real(key, name, text))
    with GitSource(str(repo.path), path="apps/web") as source:
        compiler = Compiler()
        assert source.compile(compiler, first).ok
        assert len(parsed) == 20
        reads = source.object_reads
        parsed.clear()
        comp = source.compile(compiler, second)
        assert comp.ok and comp.program.vms["v7"].cpu.bound == 4
        assert parsed == ["apps/web/vm7.flow"]
        # The new commit, its root tree, `apps`, `apps/web` and the one new file; nothing else is read again.
        assert source.object_reads - reads == 5
        reads = source.object_reads
        assert source.compile(compiler, first).ok and source.object_reads == reads and parsed == ["apps/web/vm7.flow"]


def test_a_program_path_missing_at_a_revision_is_a_diagnostic(repo):
    before = repo.commit({"README": "nothing yet\n"}, "empty")
    after = repo.commit(web_program(), "program")
    empty = repo.commit({"apps/web/main.flow": None, "apps/web/notes.txt": "moved away\n"}, "emptied")
    with GitSource(str(repo.path), path="apps/web") as source:
        comp = source.compile(Compiler(), before)
        assert codes(comp) == ["F212"] and f"revision {before[:7]}" in comp.diagnostics[0].message
        assert source.compile(Compiler(), after).ok
        # A folder left without programs must not read as a program that declares nothing.
        assert codes(source.compile(Compiler(), empty)) == ["F212"]


def test_symlinks_inside_the_tree_are_followed_and_outside_ones_are_not(repo):
    repo.commit(web_program())
    os.symlink("../../shared", repo.path / "apps/web/lib")
    os.symlink("/etc/passwd", repo.path / "apps/web/passwd.flow")
    sha = repo.commit({})
    tree = GitSource(str(repo.path)).tree(sha)
    assert isinstance(tree, GitTree)
    assert tree.kind("apps/web/lib") == "dir" and tree.read("apps/web/lib/pools.flow") == POOLS.encode()
    assert tree.kind("apps/web/passwd.flow") is None
    assert sorted(tree.list("apps/web")) == ["lib", "main.flow", "passwd.flow"]
    with pytest.raises(FileNotFoundError):
        tree.read("apps/web/passwd.flow")


# ------------------------------------------------------------------------------------------ naming and paths


def test_paths_that_leave_the_repository_are_refused(repo, tmp_path):
    for bad in ("../x", "apps/../../x", "/etc"):
        with pytest.raises(ValueError, match="leaves the repository|absolute"):
            GitSource(str(repo.path), path=bad)
    with pytest.raises(ValueError, match="cache folder"):
        GitSource("https://git.example.com/infra.git")
    assert GitSource(str(repo.path), path="./apps//web/").path == "apps/web"


@pytest.mark.parametrize("repo_arg, path, name", [
    ("https://git.example.com/team/infra.git", "", "infra"),
    ("git@git.example.com:team/infra.git", "", "infra"),
    ("ssh://git@git.example.com/infra/", "", "infra"),
    ("https://git.example.com/team/infra.git", "apps/web", "web"),
])
def test_program_name_of_a_remote(repo_arg, path, name, tmp_path):
    source = GitSource(repo_arg, path=path, cache_dir=tmp_path)
    assert not source.local and source.program_name == name


def test_program_name_of_a_local_repository(repo, tmp_path):
    assert GitSource(str(repo.path)).program_name == "infra"
    assert GitSource(str(repo.path / ".git")).program_name == "infra"
    git(tmp_path, "init", "-q", "--bare", "web.git")
    assert GitSource(str(tmp_path / "web.git")).program_name == "web"


# ------------------------------------------------------------------------------------------ remotes


def test_a_remote_is_mirrored_and_fetched(tmp_path):
    origin = Repo(tmp_path / "platform")
    first = origin.commit(web_program(), "first")
    cache = tmp_path / "cache"
    with GitSource(f"file://{origin.path}", path="apps/web", cache_dir=cache) as source:
        source.fetch()
        [mirror] = cache.iterdir()
        assert mirror.name.startswith("platform-") and (mirror / "HEAD").is_file()
        assert not (mirror / "apps").exists()  # bare: no checkout anywhere
        assert source.head() == first and source.compile(Compiler(), first).ok
        second = origin.commit(web_program(12), "second")
        assert source.head() == first  # nothing moves until the next fetch
        source.fetch()
        assert source.head() == second and source.is_ancestor(first, second)
        assert source.compile(Compiler(), second).program.vms["web"].cpu.bound == 12
        git(origin.path, "tag", "v1", first)
        source.fetch()
        assert source.resolve("v1") == first
        assert source.watch_paths() == []
    assert GitSource(f"file://{origin.path}", cache_dir=cache).program_name == "platform"


def test_a_damaged_mirror_is_made_again_by_the_next_fetch(tmp_path):
    origin = Repo(tmp_path / "origin")
    sha = origin.commit(web_program(), "first")
    blob = git(origin.path, "rev-parse", f"{sha}:apps/web/main.flow")
    with GitSource(f"file://{origin.path}", path="apps/web", cache_dir=tmp_path / "cache") as source:
        source.fetch()
        [mirror] = (tmp_path / "cache").iterdir()
        # A small fetch leaves loose objects; damage one of them.
        loose = mirror / "objects" / blob[:2] / blob[2:]
        assert loose.is_file()
        loose.unlink()
        with pytest.raises(GitError) as caught:
            source.compile(Compiler(), sha)
        assert caught.value.kind == "corrupt" and caught.value.temporary
        assert "next fetch" in str(caught.value)
        source.fetch()
        assert source.compile(Compiler(), sha).ok
        assert [p.name for p in (tmp_path / "cache").iterdir()] == [mirror.name]


@pytest.mark.parametrize("url", ["file:///nonexistent/vmflow-test.git", "http://127.0.0.1:9/infra.git"])
def test_an_unreachable_remote(url, tmp_path):
    source = GitSource(url, cache_dir=tmp_path / "cache")
    with pytest.raises(GitError) as caught:
        source.fetch(timeout=10)
    assert caught.value.kind == "unreachable" and caught.value.temporary
    with pytest.raises(GitError) as caught:
        source.head()  # the empty mirror has no branch yet
    assert caught.value.kind == "no-branch"


def test_credentials_stay_out_of_messages(tmp_path):
    source = GitSource("http://user:s3cret@127.0.0.1:9/infra.git", cache_dir=tmp_path)
    with pytest.raises(GitError) as caught:
        source.fetch(timeout=10)
    assert "s3cret" not in str(caught.value) and "s3cret" not in repr(source)


def test_a_force_push_to_unrelated_history(tmp_path):
    origin = Repo(tmp_path / "origin")
    old = origin.commit(web_program(), "old history")
    with GitSource(f"file://{origin.path}", cache_dir=tmp_path / "cache") as source:
        source.fetch()
        assert source.head() == old
        git(origin.path, "checkout", "-q", "--orphan", "rewrite")
        new = origin.commit(web_program(4), "new history")
        git(origin.path, "branch", "-M", "rewrite", "main")
        source.fetch()
        assert source.head() == new
        assert not source.related(old, new) and not source.is_ancestor(old, new)
        after = origin.commit({}, "on top")
        source.fetch()
        assert source.related(new, after) and source.is_ancestor(new, after) and not source.is_ancestor(after, new)
        assert not source.related("0" * 40, after)  # a commit the mirror never had shares nothing


# ------------------------------------------------------------------------------------------ errors


def test_missing_branch_unknown_revision_and_not_a_repository(repo, tmp_path):
    repo.commit(web_program())
    with pytest.raises(GitError) as caught:
        GitSource(str(repo.path), branch="release").head()
    assert caught.value.kind == "no-branch" and caught.value.temporary
    source = GitSource(str(repo.path))
    for bad in ("nope", "0" * 40, "--output=/tmp/x", "main~99"):
        with pytest.raises(GitError) as caught:
            source.resolve(bad)
        assert caught.value.kind == "unknown-revision" and not caught.value.temporary
    (tmp_path / "plain").mkdir()
    for where in (tmp_path / "plain", tmp_path / "absent"):
        with pytest.raises(GitError) as caught:
            GitSource(str(where)).head()
        assert caught.value.kind == "not-a-repository" and caught.value.temporary


def test_a_missing_blob_or_tree_is_corruption(repo, tmp_path):
    sha = repo.commit(web_program())
    blob = repo.object_file(f"{sha}:shared/pools.flow")
    shutil.copy(blob, tmp_path / "saved")
    blob.unlink()
    with GitSource(str(repo.path), path="apps/web") as source:
        with pytest.raises(GitError) as caught:
            source.compile(Compiler(), sha)
        assert caught.value.kind == "corrupt" and caught.value.temporary
        assert "missing" in str(caught.value)
        # Damage can be repaired (a re-fetch, a restore): the same source reads again once it is.
        shutil.copy(tmp_path / "saved", blob)
        assert source.compile(Compiler(), sha).ok
    repo.object_file(f"{sha}^{{tree}}").unlink()
    with GitSource(str(repo.path), path="apps/web") as source:
        with pytest.raises(GitError) as caught:
            source.tree("main").kind("apps")
        assert caught.value.kind == "corrupt"
    repo.object_file(sha).unlink()
    with pytest.raises(GitError) as caught:
        GitSource(str(repo.path)).head()
    assert caught.value.kind == "corrupt"


def test_a_truncated_object_is_corruption(repo):
    sha = repo.commit(web_program())
    blob = repo.object_file(f"{sha}:apps/web/main.flow")
    data = blob.read_bytes()
    blob.chmod(0o644)
    blob.write_bytes(data[: len(data) // 2])
    with GitSource(str(repo.path), path="apps/web") as source, pytest.raises(GitError) as caught:
        source.compile(Compiler(), sha)
    assert caught.value.kind == "corrupt"


# ------------------------------------------------------------------------------------------ commits and signatures


def test_commit_info(repo):
    sha = repo.commit(web_program(), "Add the web program\n\nWith a body.")
    info = GitSource(str(repo.path)).commit("main")
    assert (info.sha, info.short, info.author, info.email, info.subject) == (
        sha, sha[:7], "Tess Ter", "tess@example.com", "Add the web program")
    assert abs(info.time - time.time()) < 3600


@pytest.fixture
def keys():
    keys = Keys()
    yield keys
    keys.close()


def test_signatures(repo, tmp_path, keys):
    trusted_fpr = keys.make("Test <t@example.com>")
    other_fpr = keys.make("Other <o@example.com>")
    trusted = tmp_path / "trusted"
    keys.export(trusted_fpr, trusted)
    (trusted / "notes.txt").write_text("not a key\n")

    good = keys.signed_commit(repo, trusted_fpr, {}, "signed")
    unsigned = repo.commit({}, "unsigned")
    stranger = keys.signed_commit(repo, other_fpr, {}, "signed by someone else")
    source = GitSource(str(repo.path))
    assert source.verify(good, trusted) == (True, f"signed by Test <t@example.com> ({trusted_fpr})")
    assert source.verify(unsigned, trusted) == (False, "the commit is not signed")
    ok, why = source.verify(stranger, trusted)
    assert not ok and why == f"signed by a key that is not trusted ({other_fpr[-16:]})"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert source.verify(good, empty) == (False, f"no trusted keys in {empty}")
    # A tampered commit: same signature, different content.
    raw = subprocess.run(["git", "cat-file", "commit", good], cwd=repo.path, check=True, capture_output=True).stdout
    forged = git_hash_object(repo.path, raw.replace(b"signed\n", b"signed!\n"))
    assert source.verify(forged, trusted) == (False, "bad signature")


def git_hash_object(cwd: Path, data: bytes) -> str:
    run = subprocess.run(["git", "hash-object", "-t", "commit", "-w", "--stdin"], cwd=cwd, input=data,
                         capture_output=True, check=True)
    return run.stdout.decode().strip()


# ------------------------------------------------------------------------------------------ watching


def test_a_commit_is_seen_by_watching_the_paths_within_a_second(repo):
    repo.commit(web_program())
    source = GitSource(str(repo.path))
    paths = source.watch_paths()
    assert paths == [(repo.path / ".git").resolve()]
    stop = threading.Event()
    seen: list[float] = []

    def watch():
        for _ in watchfiles.watch(*paths, watch_filter=source.watch_filter, stop_event=stop, debounce=200,
                                  step=20, rust_timeout=200, yield_on_timeout=False):
            seen.append(time.monotonic())
            stop.set()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    time.sleep(0.3)  # the watch is in place
    before = source.head()
    started = time.monotonic()
    sha = repo.commit({"apps/web/extra.flow": POOLS.replace("rack1", "rack2")}, "more")
    thread.join(3)
    stop.set()
    assert seen and seen[0] - started < 1.0
    assert source.head() == sha != before
    # Objects being written are not news: only refs are.
    assert not source.watch_filter(None, str(paths[0] / "objects" / "ab" / "cdef"))
    assert source.watch_filter(None, str(paths[0] / "refs" / "heads" / "main"))
    assert source.watch_filter(None, str(paths[0] / "packed-refs"))


def test_a_bare_repository_receiving_a_push(tmp_path):
    bare = tmp_path / "srv" / "infra.git"
    bare.parent.mkdir()
    git(bare.parent, "init", "-q", "--bare", "-b", "main", "infra.git")
    work = Repo(tmp_path / "work")
    first = work.commit(web_program())
    git(work.path, "push", "-q", str(bare), "main")
    source = GitSource(str(bare), path="apps/web")
    assert source.local and source.head() == first and source.compile(Compiler(), "main").ok
    assert source.watch_paths() == [bare.resolve()]
    second = work.commit(web_program(6))
    git(work.path, "push", "-q", str(bare), "main")
    assert source.head() == second
