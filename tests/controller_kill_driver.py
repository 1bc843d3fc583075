"""One controller reconcile interrupted right after its first journal intent (the subprocess half of
tests/test_controller.py's kill and SIGTERM tests).

    python tests/controller_kill_driver.py kill REPO SUBPATH STATE_DIR
    python tests/controller_kill_driver.py term REPO SUBPATH STATE_DIR

`kill` SIGKILLs the process from inside our own store adapter: no finally block, atexit handler or SQLite
close runs, as when `kill -9` hits a controller in the middle of an apply. `term` sends SIGTERM instead, to
a real `Controller.run` loop with its signal handlers, which must let the change in flight finish, start no
other, and exit 0.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from controller.gitsource import GitSource
from controller.reconcile import Reconciler
from controller.service import Config, Controller
from controller.store import Store


def _after_first_intent(store: Store, sig: int) -> None:
    intent = store.intent
    sent = []

    def intent_then_signal(*args, **kwargs):
        entry = intent(*args, **kwargs)
        if not sent:
            sent.append(sig)
            os.kill(os.getpid(), sig)
        return entry

    store.intent = intent_then_signal


def main() -> None:
    mode, repo, subpath, state = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    if mode == "kill":
        store = Store(state / "vmflow.db")
        _after_first_intent(store, signal.SIGKILL)
        rec = Reconciler(GitSource(repo, "main", subpath, cache_dir=state / "git"), store, state)
        rec.reconcile_once(trigger="kill test")
        sys.exit("the reconcile finished without writing a journal intent")
    ctrl = Controller(Config(repo=repo, path=subpath, state_dir=state, listen=None, watch=False, resync=3600))
    _after_first_intent(ctrl.store, signal.SIGTERM)
    sys.exit(ctrl.run())


if __name__ == "__main__":
    main()
