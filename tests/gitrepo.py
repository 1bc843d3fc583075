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
