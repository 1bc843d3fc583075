"""One controller reconcile that SIGKILLs itself right after its first journal intent (the subprocess half
of tests/test_controller.py's kill test).

    python tests/controller_kill_driver.py REPO SUBPATH STATE_DIR

The kill is `os.kill(os.getpid(), SIGKILL)` from inside our own store adapter: no finally block, atexit
handler or SQLite close runs, as when `kill -9` hits a controller in the middle of an apply.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from controller.gitsource import GitSource
from controller.reconcile import Reconciler
from controller.store import Store


def main() -> None:
    repo, subpath, state = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    store = Store(state / "vmflow.db")
    intent = store.intent

    def intent_then_die(*args, **kwargs):
        entry = intent(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
        return entry

    store.intent = intent_then_die
    rec = Reconciler(GitSource(repo, "main", subpath, cache_dir=state / "git"), store, state)
    rec.reconcile_once(trigger="kill test")
    sys.exit("the reconcile finished without writing a journal intent")


if __name__ == "__main__":
    main()
