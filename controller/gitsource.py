"""The controller's git source: a branch of a repository, read revision by revision straight from git objects.

The only module that imports `git` (GitPython). A `GitSource` follows one branch of one repository, local (a
working repository or a bare one, read in place) or remote (a bare mirror kept under a cache folder and
fetched on demand), and hands the compiler a `GitTree` per revision: a read-only view of the commit's tree,
so a revision is compiled without a checkout and without touching any working tree.

    source = GitSource("https://git.example.com/infra.git", "main", "apps/web", cache_dir=Path("/var/cache/vmflow"))
    source.fetch()
    comp = source.compile(Compiler(), source.head())

Objects are read through one long-lived `git cat-file --batch` (GitPython's object database); file contents
are cached by blob id and folder listings by tree id across revisions, so compiling the next revision reads
only what changed, and the compiler's own cache (keyed by name and content) then re-parses only those files.

Every failure becomes a `GitError` with a kind and whether retrying can help (`temporary`): an unreachable
remote, a missing branch and a damaged repository may mend themselves; an unknown revision will not.
Reads are safe from one thread at a time; a lock serialises callers that forget.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import os
import posixpath
import re
import shutil
import subprocess
import tempfile
import threading
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import git
from git.objects.fun import tree_entries_from_data

from compiler.program import Compilation, Compiler

# Cache budgets: file contents by total size, folder listings and commits by count. A repository's program
# is a few MB of text at most; the budgets hold several revisions of it.
BLOB_CACHE_BYTES = 64 * 1024 * 1024
TREE_CACHE_ENTRIES = 8192
COMMIT_CACHE_ENTRIES = 1024
# As many symlinks as the kernel follows while resolving one path.
MAX_LINK_HOPS = 40
KEY_SUFFIXES = (".asc", ".gpg", ".pub", ".key")

_MODE_DIR, _MODE_FILE, _MODE_LINK = 0o04, 0o10, 0o12  # mode >> 12 of a tree entry; 0o16 is a submodule
_HEX40 = re.compile(r"[0-9a-f]{40}")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_SCP = re.compile(r"(?:[^@/:]+@)?[^@/:]+:")  # git's `user@host:path`: a colon before any slash
_USERINFO = re.compile(r"(//)[^/@]+@")
_NOT_DAMAGE = re.compile(r"expected commit type|dereferences to|is ambiguous")
# A fetch in a service must never wait for a password nobody will type.
_NO_PROMPT = {"GIT_TERMINAL_PROMPT": "0", "GCM_INTERACTIVE": "never", "GIT_ASKPASS": "true", "SSH_ASKPASS": "true"}


class GitErrorKind(enum.StrEnum):
    UNREACHABLE = "unreachable"  # the remote cannot be fetched (network, authentication, no such repository)
    CORRUPT = "corrupt"  # an object is missing or damaged
    NO_BRANCH = "no-branch"
    UNKNOWN_REVISION = "unknown-revision"
    NOT_A_REPOSITORY = "not-a-repository"  # the folder is not (or no longer) a repository git will open


class GitError(Exception):
    """A git source failed. `kind` is a `GitErrorKind` value; `temporary` says whether retrying (with backoff)
    can succeed without anyone changing the repository's history."""

    def __init__(self, message: str, kind: str, temporary: bool) -> None:
        super().__init__(message)
        self.message = message
        self.kind = GitErrorKind(kind)
        self.temporary = temporary

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class CommitInfo:
    sha: str
    short: str
    author: str
    email: str
    time: float  # when it was committed, seconds since the epoch
    subject: str


def _locked(method):
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return run


class _Lru(OrderedDict):
    """Least recently used first; evicts past a budget of entries or of total size."""

    def __init__(self, budget: int, size=lambda value: 1) -> None:
        super().__init__()
        self.budget = budget
        self.size = size
        self.total = 0

    def get(self, key):
        value = super().get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        cost = self.size(value)
        if cost > self.budget:
            return
        self[key] = value
        self.total += cost
        while self.total > self.budget:
            _, old = self.popitem(last=False)
            self.total -= self.size(old)


def is_remote(repo: str) -> bool:
    """A URL (`https://`, `ssh://`, `file://`, ...) or git's `user@host:path`, rather than a local folder."""
    if _URL.match(repo):
        return True
    return bool(_SCP.match(repo)) and not os.path.exists(repo)


def redact(text: str) -> str:
    """Credentials embedded in a URL (`https://user:token@host/...`) left out of messages."""
    return _USERINFO.sub(r"\1***@", text)


def _program_path(path: str) -> str:
    raw = path
    path = path.replace("\\", "/").strip()
    if "\0" in path:
        raise ValueError(f"program path {raw!r} contains a NUL byte")
    if path.startswith("/") or re.match(r"[A-Za-z]:/", path):
        raise ValueError(f"program path {raw!r} is absolute: give it relative to the repository's top")
    path = posixpath.normpath(path) if path else "."
    if path == ".." or path.startswith("../"):
        raise ValueError(f"program path {raw!r} leaves the repository")
    return "" if path == "." else path


def _check_branch(branch: str) -> str:
    if not branch or branch.startswith(("-", "/")) or branch.endswith(("/", ".lock", ".")) or ".." in branch \
            or "//" in branch or "@{" in branch or any(c in branch for c in " ~^:?*[\\\x7f") \
            or any(ord(c) < 32 for c in branch):
        raise ValueError(f"{branch!r} is not a valid branch name")
    return branch


def _repo_name(repo: str, remote: bool) -> str:
    """The folder `git clone` would make for a repository: its last component without `.git`."""
    if remote:
        rest = _URL.sub("", repo, count=1) if _URL.match(repo) else repo.split(":", 1)[-1]
        last = re.split(r"[/:]", rest.rstrip("/"))[-1]
    else:
        folder = Path(repo).expanduser().resolve()
        last = folder.parent.name if folder.name == ".git" else folder.name
    name = last[:-4] if last.endswith(".git") and len(last) > 4 else last
    return name or "repository"


def _first_line(text: str) -> str:
    """The line of git's stderr that says what went wrong: its first `fatal:` or `error:`, unless that is the
    generic word of the transport, when the line before it (ssh's own) says more."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    at = next((i for i, ln in enumerate(lines) if ln.startswith(("fatal:", "error:"))), 0)
    if at > 0 and "Could not read from remote repository" in lines[at]:
        at -= 1
    line = lines[at] if lines else "no output"
    return redact(line.removeprefix("fatal: ").removeprefix("error: "))


class GitTree:
    """One commit's tree as a compiler `Tree` (compiler/program.py). Symlinks are followed inside the tree;
    one that leaves it, and submodules, read as missing. Built by `GitSource.tree`."""

    def __init__(self, source: GitSource, commit: str, root: bytes) -> None:
        self.source = source
        self.commit = commit
        self.label = f"revision {commit[:7]}"
        self._root = root
        self._found: dict[str, tuple[int, bytes] | None] = {}

    def _entry(self, path: str) -> tuple[int, bytes] | None:
        """(mode, object id) of what a path names, links followed."""
        if path in self._found:
            return self._found[path]
        found = self._walk(path)
        self._found[path] = found
        return found

    def _walk(self, path: str) -> tuple[int, bytes] | None:
        normal = _normal(path)
        if normal is None:
            return None
        parts = normal.split("/") if normal else []
        mode, oid, done, i, hops = 0o040000, self._root, [], 0, 0
        while i < len(parts):
            if mode >> 12 != _MODE_DIR:
                return None
            entry = self.source._listing(oid).get(parts[i])
            if entry is None:
                return None
            if entry[0] >> 12 == _MODE_LINK:
                hops += 1
                if hops > MAX_LINK_HOPS:
                    return None
                target = self.source._blob(entry[1]).decode("utf-8", "surrogateescape")
                normal = _normal(posixpath.join("/".join(done), target, *parts[i + 1:]))
                if target.startswith("/") or normal is None:
                    return None
                parts = normal.split("/") if normal else []
                mode, oid, done, i = 0o040000, self._root, [], 0
                continue
            mode, oid = entry
            done.append(parts[i])
            i += 1
        return mode, oid

    def kind(self, path: str) -> str | None:
        entry = self._entry(path)
        if entry is None:
            return None
        return {_MODE_DIR: "dir", _MODE_FILE: "file"}.get(entry[0] >> 12)

    def list(self, directory: str) -> list[str]:
        entry = self._entry(directory)
        if entry is None:
            raise FileNotFoundError(2, "No such file or directory", directory)
        if entry[0] >> 12 != _MODE_DIR:
            raise NotADirectoryError(20, "Not a directory", directory)
        return list(self.source._listing(entry[1]))

    def read(self, path: str) -> bytes:
        entry = self._entry(path)
        if entry is None or entry[0] >> 12 not in (_MODE_DIR, _MODE_FILE):
            raise FileNotFoundError(2, "No such file or directory", path)
        if entry[0] >> 12 == _MODE_DIR:
            raise IsADirectoryError(21, "Is a directory", path)
        return self.source._blob(entry[1])


def _normal(path: str) -> str | None:
    if path.startswith("/"):
        return None
    path = posixpath.normpath(path) if path else "."
    if path == ".." or path.startswith("../"):
        return None
    return "" if path == "." else path


class GitSource:
    """One branch of one repository, and the program at `path` inside it.

    `repo` is a local folder (a working repository or a bare one) or a remote URL (`https://`, `ssh://`,
    `git@host:...`, `file://`); a remote is mirrored into a bare repository under `cache_dir`, in a folder
    named after the URL's hash. `path` is the program's folder relative to the repository's top ("" for the
    top itself). Nothing touches the network or the disk until a method needs it.
    """

    def __init__(self, repo: str, branch: str = "main", path: str = "", cache_dir: Path | None = None) -> None:
        self.repo = str(repo)
        self.branch = _check_branch(branch)
        self.path = _program_path(path)
        self.local = not is_remote(self.repo)
        # The repository read: the local one itself, or the mirror of a remote.
        if self.local:
            self.folder = Path(self.repo).expanduser()
        else:
            if cache_dir is None:
                raise ValueError(f"a remote repository ({redact(self.repo)}) needs a cache folder for its mirror")
            digest = hashlib.sha256(self.repo.encode("utf-8", "surrogateescape")).hexdigest()[:16]
            slug = re.sub(r"[^A-Za-z0-9._-]", "_", _repo_name(self.repo, True))[:40]
            self.folder = Path(cache_dir) / f"{slug}-{digest}.git"
        # The ownership "program" name: the folder `vmflow apply <checkout>/<path>` would be given, which for
        # a path naming one `.flow` file is the folder holding it (as `vmflow apply dir/web.flow` names it).
        folder = posixpath.dirname(self.path) if self.path.endswith(".flow") else self.path
        self.program_name = posixpath.basename(folder) or _repo_name(self.repo, not self.local)
        self.object_reads = 0  # objects read from the repository; cache hits do not count
        self._repo: git.Repo | None = None
        self._lock = threading.RLock()
        self._blobs = _Lru(BLOB_CACHE_BYTES, len)
        self._trees = _Lru(TREE_CACHE_ENTRIES)
        self._commits = _Lru(COMMIT_CACHE_ENTRIES)  # commit sha -> its tree's id
        # A damaged mirror is ours to replace: the next fetch makes it again from the remote.
        self._remake_mirror = False
        self._watched: Path | None = None  # the git folder `watch_paths` named

    def __repr__(self) -> str:
        return f"GitSource({redact(self.repo)!r}, branch={self.branch!r}, path={self.path!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @_locked
    def close(self) -> None:
        """Stop the long-lived git processes and let go of the repository (it is reopened on next use)."""
        if self._repo is not None:
            self._repo.close()
            self._repo = None

    # ------------------------------------------------------------------------------------------ plumbing

    def _where(self) -> str:
        return redact(self.repo)

    def _open(self) -> git.Repo:
        if self._repo is None:
            if not self.local and not self.folder.exists():
                self.fetch()
            try:
                self._repo = git.Repo(self.folder)
            except (git.InvalidGitRepositoryError, git.NoSuchPathError):
                self._remake_mirror = not self.local
                raise GitError(f"`{self._where()}` is not a git repository", GitErrorKind.NOT_A_REPOSITORY,
                               True) from None
            except (OSError, ValueError, git.GitError) as exc:
                raise GitError(f"cannot open `{self._where()}`: {exc}", GitErrorKind.NOT_A_REPOSITORY,
                               True) from None
        return self._repo

    def _run(self, *args: str, timeout: float | None = None, env: dict | None = None,
             config: tuple[str, ...] = ()) -> tuple[int, str, str]:
        """A git command in the repository: (status, stdout, stderr); failing to start it at all is an error."""
        repo = self._open()
        command = [git.Git.GIT_PYTHON_GIT_EXECUTABLE or "git"]
        for c in config:
            command += ["-c", c]
        try:
            status, out, err = repo.git.execute([*command, *args], with_extended_output=True, with_exceptions=False,
                                                kill_after_timeout=timeout, env=env)
        except git.GitCommandNotFound:
            raise GitError("the `git` command is not installed", GitErrorKind.NOT_A_REPOSITORY, True) from None
        except OSError as exc:
            raise self._damaged(exc) from None
        return status, out, err

    def _damaged(self, exc: BaseException | str) -> GitError:
        """What a failure to read the repository means: gone, not a repository (any more), or corrupt."""
        if self._repo is not None:
            self._repo.git.clear_cache()  # a wedged `cat-file` would poison every later read
        text = exc if isinstance(exc, str) else (getattr(exc, "stderr", None) or str(exc))
        reason = _first_line(str(text))
        if not self.local:
            self._remake_mirror = True
            reason += "; the next fetch makes the mirror again"
        if not self.folder.exists():
            return GitError(f"`{self._where()}` no longer exists", GitErrorKind.NOT_A_REPOSITORY, True)
        if "not a git repository" in reason or "dubious ownership" in reason:
            return GitError(f"`{self._where()}` is not a git repository: {reason}", GitErrorKind.NOT_A_REPOSITORY,
                            True)
        return GitError(f"the repository `{self._where()}` is damaged: {reason}", GitErrorKind.CORRUPT, True)

    def _object(self, oid: bytes, kind: str) -> bytes:
        hexsha = oid.hex()
        try:
            _, typename, size, data = self._open().git.get_object_data(hexsha)
        except (ValueError, OSError, git.GitError) as exc:
            missing = "missing" in str(exc)
            raise self._damaged(f"{kind} {hexsha} is missing" if missing else exc) from None
        self.object_reads += 1
        typename = typename.decode() if isinstance(typename, bytes) else typename
        if typename != kind:
            raise self._damaged(f"object {hexsha} is a {typename}, not a {kind}")
        # `cat-file` announces the size before it inflates the object, and a damaged one then comes out short
        # (or not at all) with only a message on stderr; the object's own hash is the one reliable check.
        digest = hashlib.sha1(b"%s %d\0" % (kind.encode(), len(data)), usedforsecurity=False)
        digest.update(data)
        if len(data) != size or digest.digest() != oid:
            raise self._damaged(f"{kind} {hexsha} is damaged: its content does not match its id")
        return data

    @_locked
    def _listing(self, oid: bytes) -> dict[str, tuple[int, bytes]]:
        """A folder's entries by name: (mode, object id)."""
        listing = self._trees.get(oid)
        if listing is None:
            data = self._object(oid, "tree")
            try:
                listing = {name: (mode, sha) for sha, mode, name in tree_entries_from_data(data)}
            except ValueError as exc:
                raise self._damaged(f"tree {oid.hex()}: {exc}") from None
            self._trees.put(oid, listing)
        return listing

    @_locked
    def _blob(self, oid: bytes) -> bytes:
        data = self._blobs.get(oid)
        if data is None:
            data = self._object(oid, "blob")
            self._blobs.put(oid, data)
        return data

    def _rev_parse(self, spec: str) -> str | None:
        status, out, err = self._run("rev-parse", "--verify", "--quiet", spec)
        if status == 0 and _HEX40.fullmatch(out.strip()):
            return out.strip()
        # A name for something other than a commit, or a short sha of several objects, is the name's
        # fault, not the repository's: `resolve` says which.
        if err.strip() and not _NOT_DAMAGE.search(err):
            raise self._damaged(err)
        return None

    def _object_type(self, spec: str) -> str | None:
        """`commit`, `tree`, `blob` or `tag` for an object the repository has, else None."""
        status, out, _ = self._run("cat-file", "-t", spec)
        return out.strip() if status == 0 and out.strip() in ("commit", "tree", "blob", "tag") else None

    def _commit_tree(self, sha: str) -> bytes:
        """The root tree's id of a commit known to exist."""
        root = self._commits.get(sha)
        if root is None:
            data = self._object(bytes.fromhex(sha), "commit")
            first = data.split(b"\n", 1)[0]
            if not first.startswith(b"tree ") or not _HEX40.fullmatch(first[5:].decode("ascii", "replace")):
                raise self._damaged(f"commit {sha} has no tree")
            root = bytes.fromhex(first[5:].decode("ascii"))
            self._commits.put(sha, root)
        return root

    # ------------------------------------------------------------------------------------------ revisions

    def fetch(self, timeout: float = 30) -> None:
        """Bring the mirror up to date with the remote (creating it on first use); nothing for a local
        repository, which is read in place. Branches and tags are mirrored, pruned and force-updated."""
        if self.local:
            return
        with self._lock:
            mirror = self.folder
            if self._remake_mirror and mirror.exists():
                self.close()
                try:
                    # Renamed first, so that a half-removed mirror is never opened as if it were whole.
                    doomed = Path(tempfile.mkdtemp(prefix=f".{mirror.name}.old.", dir=mirror.parent))
                    os.rename(mirror, doomed / "mirror")
                except OSError as exc:
                    raise GitError(f"cannot replace the damaged mirror `{mirror}`: {exc}", GitErrorKind.CORRUPT,
                                   True) from None
                shutil.rmtree(doomed, ignore_errors=True)
            self._remake_mirror = False
            if not mirror.exists():
                self._create_mirror(mirror)
            status, _, err = self._run("fetch", "--prune", "--force", "--quiet", "origin", timeout=timeout,
                                       env=_NO_PROMPT)
            self._repo.git.clear_cache()  # the long-lived `cat-file` learns of new packs on restart
            if status != 0:
                raise GitError(f"cannot fetch `{self._where()}`: {_first_line(err)}", GitErrorKind.UNREACHABLE, True)

    def _create_mirror(self, mirror: Path) -> None:
        mirror.parent.mkdir(parents=True, exist_ok=True)
        # Made aside and renamed into place, so a half-made mirror is never mistaken for a real one.
        staging = Path(tempfile.mkdtemp(prefix=f".{mirror.name}.", dir=mirror.parent))
        try:
            new = git.Repo.init(staging, bare=True)
            with new.config_writer() as cfg:
                cfg.set_value('remote "origin"', "url", self.repo)
                cfg.set_value('remote "origin"', "fetch", "+refs/heads/*:refs/heads/*")
                cfg.add_value('remote "origin"', "fetch", "+refs/tags/*:refs/tags/*")
            new.close()
            try:
                os.rename(staging, mirror)
            except OSError:
                if not mirror.exists():
                    raise
        except (OSError, git.GitError) as exc:
            raise GitError(f"cannot create the mirror of `{self._where()}` in `{mirror.parent}`: {exc}",
                           GitErrorKind.UNREACHABLE, True) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @_locked
    def head(self) -> str:
        """The full sha of the branch's tip (for a remote: as of the last fetch)."""
        sha = self._rev_parse(f"refs/heads/{self.branch}")
        if sha is None:
            raise GitError(f"branch `{self.branch}` does not exist in `{self._where()}` ({self._branches()})",
                           GitErrorKind.NO_BRANCH, True)
        self._commit_tree(sha)  # the tip's commit object must be readable
        return sha

    @_locked
    def resolve(self, ref: str) -> str:
        """Any revision git understands (sha, short sha, branch, tag, `HEAD~1`, `origin/x`) to a full commit sha."""
        shown = ref if len(ref) <= 80 else ref[:80] + "…"
        if not ref or ref.startswith("-") or any(c in ref for c in "\0\n\r") or len(ref) > 4096:
            raise GitError(f"`{shown}` is not a revision", GitErrorKind.UNKNOWN_REVISION, False)
        if ref in self._commits:
            return ref
        sha = self._rev_parse(f"{ref}^{{commit}}")
        if sha is None:
            kind = self._object_type(ref)
            if kind is not None:
                raise GitError(f"`{shown}` names a {kind}, not a commit", GitErrorKind.UNKNOWN_REVISION, False)
            if re.fullmatch(r"[0-9a-f]{4,39}", ref) and self._rev_parse(ref) is None:
                _, _, err = self._run("rev-parse", "--verify", ref)
                if "ambiguous" in err:
                    raise GitError(f"`{ref}` is a short sha of several objects: give more of it",
                                   GitErrorKind.UNKNOWN_REVISION, False)
            # A name that exists but whose object does not is damage, not a typo.
            if not _HEX40.fullmatch(ref) and self._rev_parse(ref) is not None:
                raise self._damaged(f"`{shown}` names an object the repository does not have")
            raise GitError(f"unknown revision `{shown}` in `{self._where()}`{self._shallow_hint()}",
                           GitErrorKind.UNKNOWN_REVISION, False)
        return sha

    def _branches(self) -> str:
        """The branches there are, for a message about one that is not."""
        status, out, _ = self._run("for-each-ref", "--count=11", "--format=%(refname:short)", "refs/heads/")
        names = out.split() if status == 0 else []
        if not names:
            return "it has no branches: nothing was committed yet" if status == 0 else "its branches cannot be read"
        return "its branches: " + ", ".join(f"`{n}`" for n in names[:10]) + (", …" if len(names) > 10 else "")

    def _shallow_hint(self) -> str:
        """Why a revision may be missing from a shallow clone (CI checkouts are shallow by default), or ""."""
        status, out, _ = self._run("rev-parse", "--is-shallow-repository")
        if status != 0 or out.strip() != "true":
            return ""
        return (": the repository is a shallow clone, which holds only part of the history; fetch the rest "
                "(`git fetch --unshallow`, or `fetch-depth: 0` with actions/checkout)")

    @_locked
    def check(self) -> None:
        """Raise the GitError that reading a local repository would raise (it does not exist, is not a folder,
        is not a repository), without touching the network; nothing for a remote, whose mirror is made by
        `fetch`."""
        if not self.local:
            return
        if not self.folder.exists():
            raise GitError(f"the repository `{self._where()}` does not exist", GitErrorKind.NOT_A_REPOSITORY, True)
        if not self.folder.is_dir():
            raise GitError(f"the repository `{self._where()}` is a file, not a folder", GitErrorKind.NOT_A_REPOSITORY,
                           True)
        try:
            self._open()
        except GitError as e:
            # A folder inside a repository is a common slip: name the top and the path to give instead.
            folder = self.folder.resolve()
            top = next((d for d in folder.parents if (d / ".git").exists()), None)
            if top is None:
                raise
            rel = posixpath.join(folder.relative_to(top).as_posix(), self.path) if self.path else \
                folder.relative_to(top).as_posix()
            raise GitError(f"{e}; it is a folder inside the repository `{top}`: give --repo {top} --path {rel}",
                           e.kind, e.temporary) from None

    def _known(self, rev: str) -> str | None:
        try:
            return self.resolve(rev)
        except GitError as exc:
            if exc.kind is GitErrorKind.UNKNOWN_REVISION:
                return None
            raise

    @_locked
    def tree(self, rev: str) -> GitTree:
        sha = self.resolve(rev)
        return GitTree(self, sha, self._commit_tree(sha))

    def compile(self, compiler: Compiler, rev: str) -> Compilation:
        """The program at `path`, as of `rev`. A path missing at that revision is an F212 diagnostic."""
        return compiler.compile_tree(self.tree(rev), self.path)

    @_locked
    def is_ancestor(self, old: str, new: str) -> bool:
        """Whether `new` contains `old` (a fast-forward from `old`). A revision the repository does not have
        (any more) is an ancestor of nothing."""
        a, b = self._known(old), self._known(new)
        if a is None or b is None:
            return False
        status, _, err = self._run("merge-base", "--is-ancestor", a, b)
        if status in (0, 1):
            return status == 0
        raise self._damaged(err)

    @_locked
    def related(self, a: str, b: str) -> bool:
        """Whether two revisions share any history: False after a force-push to unrelated history."""
        x, y = self._known(a), self._known(b)
        if x is None or y is None:
            return False
        status, _, err = self._run("merge-base", x, y)
        if status in (0, 1):
            return status == 0
        raise self._damaged(err)

    @_locked
    def commit(self, rev: str) -> CommitInfo:
        sha = self.resolve(rev)
        try:
            c = self._open().commit(sha)
            summary = c.summary if isinstance(c.summary, str) else c.summary.decode("utf-8", "replace")
            return CommitInfo(sha, sha[:7], c.author.name or "", c.author.email or "", float(c.committed_date),
                              summary)
        except (ValueError, OSError, git.GitError) as exc:
            raise self._damaged(exc) from None

    # ------------------------------------------------------------------------------------------ signatures

    @_locked
    def verify(self, rev: str, trusted_keys: Path) -> tuple[bool, str]:
        """Whether the commit carries a good OpenPGP signature by one of the public keys in `trusted_keys`
        (files `*.asc`, `*.gpg`, `*.pub`, `*.key`): (True, "signed by UID (FINGERPRINT)") or (False, why).

        The keys are imported into a private, temporary GnuPG home that trusts exactly them; the user's own
        keyring is never read, so a key that happens to be there proves nothing."""
        sha = self.resolve(rev)
        raw = self._object(bytes.fromhex(sha), "commit")
        header = raw.split(b"\n\n", 1)[0]
        signature = re.search(rb"^gpgsig(?:-sha256)? (.*)$", header, re.MULTILINE)
        if signature is None:
            return False, "the commit is not signed"
        if b"BEGIN PGP SIGNATURE" not in signature.group(1):
            scheme = "SSH" if b"SSH SIGNATURE" in signature.group(1) else "X.509"
            return False, f"the commit has an {scheme} signature; only OpenPGP signatures are checked"
        trusted_keys = Path(trusted_keys)
        keys = sorted(p for p in trusted_keys.glob("*") if p.suffix in KEY_SUFFIXES and p.is_file()) \
            if trusted_keys.is_dir() else []
        gpg = shutil.which("gpg")
        if gpg is None:
            return False, "gpg is not installed, so no signature can be checked"
        home = tempfile.mkdtemp(prefix="vmflow-gpg-")
        try:
            # Every imported key is trusted fully: the folder is the trust decision. No agent or key server.
            Path(home, "gpg.conf").write_text("trust-model always\nno-autostart\n")
            imported = 0
            if keys:
                run = subprocess.run([gpg, "--homedir", home, "--batch", "--no-tty", "--status-fd", "1", "--import",
                                      *map(str, keys)], capture_output=True, text=True, timeout=60, check=False)
                imported = run.stdout.count("[GNUPG:] IMPORT_OK")
            if not imported:
                return False, f"no trusted keys in {trusted_keys}"
            _, _, err = self._run("verify-commit", "--raw", sha, timeout=60, env={"GNUPGHOME": home},
                                  config=(f"gpg.program={gpg}", f"gpg.openpgp.program={gpg}"))
            return _signature_verdict(err)
        except (OSError, subprocess.SubprocessError) as exc:
            return False, f"the signature cannot be checked: {exc}"
        finally:
            if shutil.which("gpgconf"):  # an agent started despite `no-autostart` must not outlive its home
                subprocess.run(["gpgconf", "--homedir", home, "--kill", "all"], capture_output=True, check=False)
            shutil.rmtree(home, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ watching

    @_locked
    def watch_paths(self) -> list[Path]:
        """What to watch (with watchfiles, recursively) to see the branch move within a second; nothing for a
        remote, which is polled or told by a webhook.

        A commit, a push into the repository, `git fetch` into a local branch and `git pack-refs` all end by
        renaming a lock file over `refs/heads/<branch>`, `packed-refs`, `HEAD` or a file of `reftable/`. A
        watch on a file is lost when the file is replaced that way, so this is the git folder itself (the
        common one, which a linked worktree shares); `watch_filter` keeps only the events that can matter.
        """
        if not self.local:
            return []
        self._watched = Path(self._open().common_dir).resolve()
        return [self._watched]

    def watch_filter(self, change: object, path: str) -> bool:
        """For watchfiles' `watch_filter` over `watch_paths()`: True for a change that may have moved a branch
        (not for the objects, logs and index that a commit also writes)."""
        if self._watched is None:
            return True
        rel = os.path.relpath(path, self._watched).replace(os.sep, "/")
        return rel in ("HEAD", "packed-refs", "refs/heads") or rel.startswith(("refs/heads/", "reftable/",
                                                                               "packed-refs."))


def _signature_verdict(status: str) -> tuple[bool, str]:
    """What GnuPG's status lines (`[GNUPG:] GOODSIG ...`) say about a signature."""
    lines = {}
    for line in status.splitlines():
        if line.startswith("[GNUPG:] "):
            word, _, rest = line[9:].partition(" ")
            lines.setdefault(word, rest)
    if "BADSIG" in lines:
        return False, "bad signature"
    if "NO_PUBKEY" in lines or "ERRSIG" in lines:
        keyid = (lines.get("NO_PUBKEY") or lines.get("ERRSIG", "")).split(" ")[0]
        if "NO_PUBKEY" in lines:
            return False, f"signed by a key that is not trusted ({keyid})"
        return False, f"the signature cannot be checked ({keyid})"
    for word, why in (("EXPKEYSIG", "signed by an expired key"), ("REVKEYSIG", "signed by a revoked key"),
                      ("EXPSIG", "the signature has expired")):
        if word in lines:
            return False, f"{why} ({lines[word].split(' ')[0]})"
    if "GOODSIG" in lines and "VALIDSIG" in lines:
        uid = urllib.parse.unquote(lines["GOODSIG"].partition(" ")[2])
        fields = lines["VALIDSIG"].split(" ")
        fingerprint = fields[9] if len(fields) > 9 else fields[0]
        return True, f"signed by {uid} ({fingerprint})"
    return False, f"the signature cannot be checked: {_first_line(status)}"
