"""Real git repositories in temporary folders, for the controller's tests: commit files, read shas.

git runs with a private HOME and no system config, so the machine's settings (signing, hooks, default
branch) cannot change what the tests see.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_env(home: Path) -> dict:
    env = dict(os.environ)
    env.update(HOME=str(home), GIT_CONFIG_NOSYSTEM="1", GIT_AUTHOR_NAME="Ada", GIT_AUTHOR_EMAIL="ada@example.com",
               GIT_COMMITTER_NAME="Ada", GIT_COMMITTER_EMAIL="ada@example.com")
    return env


class Repo:
    """A working repository to commit into."""

    def __init__(self, path: Path, branch: str = "main", user: tuple[str, str] = ("Ada", "ada@example.com")) -> None:
        self.path = path
        self.env = git_env(path.parent)
        self.env.update(GIT_AUTHOR_NAME=user[0], GIT_AUTHOR_EMAIL=user[1], GIT_COMMITTER_NAME=user[0],
                        GIT_COMMITTER_EMAIL=user[1])
        path.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "-b", branch)
        for key, value in (("user.name", user[0]), ("user.email", user[1]), ("commit.gpgsign", "false"),
                           ("tag.gpgsign", "false")):
            self.git("config", key, value)

    def git(self, *args: str, env: dict | None = None) -> str:
        out = subprocess.run(["git", *args], cwd=self.path, env={**self.env, **(env or {})}, capture_output=True,
                             text=True)
        assert out.returncode == 0, f"git {' '.join(args)}: {out.stderr}"
        return out.stdout.strip()

    def write(self, files: dict[str, str | None]) -> None:
        """Write (or, for None, delete) files in the working tree."""
        for name, text in files.items():
            f = self.path / name
            if text is None:
                f.unlink()
                continue
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(text)

    def commit(self, files: dict[str, str | None], message: str = "change", *args: str,
               env: dict | None = None) -> str:
        """Write the files and commit everything; returns the new sha."""
        self.write(files)
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message, *args, env=env)
        return self.head()

    def head(self) -> str:
        return self.git("rev-parse", "HEAD")

    def object_file(self, rev: str) -> Path:
        sha = self.git("rev-parse", rev)
        return self.path / ".git" / "objects" / sha[:2] / sha[2:]


class Keys:
    """Ed25519 signing keys in a throwaway GnuPG home (never the user's keyring)."""

    def __init__(self) -> None:
        import shutil
        import tempfile

        if shutil.which("gpg") is None:
            raise RuntimeError("gpg is not installed: `apt-get install gnupg` (make test installs it)")
        self.home = tempfile.mkdtemp(prefix="vmflow-gpg-")  # short: the agent's socket path has a length limit
        os.chmod(self.home, 0o700)
        self.env = dict(os.environ, GNUPGHOME=self.home)

    def _gpg(self, *args: str) -> bytes:
        return subprocess.run(["gpg", "--batch", *args], check=True, capture_output=True, env=self.env).stdout

    def make(self, uid: str) -> str:
        """A new key; returns its fingerprint."""
        self._gpg("--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never")
        listing = self._gpg("--with-colons", "--list-keys", uid).decode()
        return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))

    def export(self, fpr: str, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{fpr[-16:]}.asc").write_bytes(self._gpg("--armor", "--export", fpr))

    def signed_commit(self, repo: Repo, fpr: str, files: dict[str, str | None], message: str) -> str:
        return repo.commit(files, message, "-S", env={"GNUPGHOME": self.home, "GIT_CONFIG_PARAMETERS":
                                                       f"'gpg.program=gpg' 'user.signingkey={fpr}'"})

    def close(self) -> None:
        import shutil

        subprocess.run(["gpgconf", "--homedir", self.home, "--kill", "all"], capture_output=True)
        shutil.rmtree(self.home, ignore_errors=True)
