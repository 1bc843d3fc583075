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
    def __init__(self, path: Path, branch: str = "main") -> None:
        self.path = path
        self.env = git_env(path.parent)
        path.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "-b", branch)
        self.git("config", "commit.gpgsign", "false")

    def git(self, *args: str) -> str:
        out = subprocess.run(["git", *args], cwd=self.path, env=self.env, check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def commit(self, files: dict[str, str | None], message: str = "change") -> str:
        """Write (or, for None, delete) files and commit them; returns the new sha."""
        for name, text in files.items():
            f = self.path / name
            if text is None:
                f.unlink()
                continue
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(text)
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        return self.head()

    def head(self) -> str:
        return self.git("rev-parse", "HEAD")


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
        for name, text in files.items():
            (repo.path / name).parent.mkdir(parents=True, exist_ok=True)
            (repo.path / name).write_text(text)
        repo.git("add", "-A")
        subprocess.run(["git", "-c", "gpg.program=gpg", "-c", f"user.signingkey={fpr}", "commit", "-q", "-S",
                        "--allow-empty", "-m", message], cwd=repo.path, check=True, capture_output=True,
                       env={**repo.env, "GNUPGHOME": self.home})
        return repo.head()

    def close(self) -> None:
        import shutil

        subprocess.run(["gpgconf", "--homedir", self.home, "--kill", "all"], capture_output=True)
        shutil.rmtree(self.home, ignore_errors=True)
