"""Run one `vmflow apply --prune` of a program and SIGKILL it at a chosen point (the subprocess half of
tests/test_kill.py).

    python tests/kill_driver.py PROGRAM_DIR none            apply to the end, print the trace as JSON
    python tests/kill_driver.py PROGRAM_DIR KIND:N:WHEN     die right before or after the N-th event of KIND

It does what `vmflow apply --prune --auto-approve --keep-snapshots 1` does (load, take the lock, plan,
apply, persist the embedded hypervisor after every settled change) with the library's own pieces, and
counts the events a kill can fall between:

  call     a mutating Hypervisor call (define, start, stop, undefine, set_vcpus, set_memory, snapshot,
           set_owner, revert, delete_snapshot)
  intent   a journal intent written (Store.intent)
  settle   a journal outcome written (Store.settle)
  save     the embedded hypervisor's state written to <state-dir>/hypervisor.xml (the `saved` callback)
  rename   inside a save: the new state is in a temporary file, about to replace hypervisor.xml

WHEN is `before` or `after` the event. The kill is `os.kill(os.getpid(), SIGKILL)`: no finally block,
no atexit handler and no SQLite close runs, as when the machine's OOM killer or an operator's
`kill -9` hits a real apply.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

from controller import embedded
from controller.apply import Applier
from controller.context import load, make_plan
from controller.hypervisor import Hypervisor
from controller.store import Store

MUTATIONS = ("define", "start", "stop", "undefine", "set_vcpus", "set_memory", "set_owner", "snapshot", "revert",
             "delete_snapshot")


class Events:
    """Counts events per kind and dies at the one the command line names."""

    def __init__(self, spec: str) -> None:
        self.trace: list[dict] = []
        self.counts: dict[str, int] = {}
        self.kill = None
        if spec != "none":
            kind, n, when = spec.split(":")
            assert when in ("before", "after"), spec
            self.kill = (kind, int(n), when)

    def before(self, kind: str, what: str) -> int:
        n = self.counts.get(kind, 0) + 1
        self.counts[kind] = n
        self._maybe_die(kind, n, "before")
        self.trace.append(f"{kind} {what}")
        return n

    def after(self, kind: str, n: int) -> None:
        self._maybe_die(kind, n, "after")

    def _maybe_die(self, kind: str, n: int, when: str) -> None:
        if self.kill == (kind, n, when):
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def killing_hypervisor(events: Events) -> type[Hypervisor]:
    """A Hypervisor whose every mutation is a counted event."""

    def wrap(name: str):
        real = getattr(Hypervisor, name)

        def call(self, *args, **kwargs):
            # define() takes the domain XML; the other mutations take the domain name first.
            target = args[0]
            if name == "define":
                m = re.search(r"<name>([^<]*)</name>", target)
                target = m.group(1) if m else "?"
            n = events.before("call", f"{name} {target}")
            result = real(self, *args, **kwargs)
            events.after("call", n)
            return result

        return call

    return type("KillingHypervisor", (Hypervisor,), {m: wrap(m) for m in MUTATIONS})


def killing_store(events: Events) -> type[Store]:
    """A Store whose journal writes are counted events (an intent is counted once it is committed)."""
    addresses: dict[int, str] = {}

    class KillingStore(Store):
        def intent(self, apply_id, address, op, snapshot, before):
            n = events.before("intent", f"{op} {address}")
            entry = super().intent(apply_id, address, op, snapshot, before)
            addresses[entry] = address
            events.after("intent", n)
            return entry

        def settle(self, entry_id, status, detail=None):
            n = events.before("settle", f"{status} {addresses.get(entry_id, entry_id)}")
            super().settle(entry_id, status, detail)
            events.after("settle", n)

    return KillingStore


def counting_replace(events: Events):
    """os.replace, with the rename of the embedded hypervisor's state file as a counted event."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name != embedded.NODE_FILE:
            return real(src, dst, *args, **kwargs)
        n = events.before("rename", embedded.NODE_FILE)
        real(src, dst, *args, **kwargs)
        events.after("rename", n)

    return replace


def main() -> None:
    program_dir, spec = Path(sys.argv[1]), sys.argv[2]
    events = Events(spec)
    os.replace = counting_replace(events)  # embedded.save renames through os.replace
    t = load(program_dir, None, None)
    assert t.compilation.ok and t.embedded, "the kill test drives the embedded default"
    store = killing_store(events)(t.state_dir / "vmflow.db")
    store.acquire(t.program, "kill-driver", f"kill_driver {spec}")
    hv = killing_hypervisor(events)(t.uri)

    def saved() -> None:
        n = events.before("save", embedded.NODE_FILE)
        embedded.save(t.state_dir, hv.export())
        events.after("save", n)

    plan, _ = make_plan(t, hv, prune=True)
    # keep_snapshots=1 so that the VM with an older vmflow snapshot also exercises delete_snapshot.
    result = Applier(hv, store, keep_snapshots=1, saved=saved).apply(plan, t.program)
    store.release(t.program)
    store.close()
    hv.close()
    print(json.dumps({"ok": result.ok, "outcomes": [(o.address, o.result) for o in result.outcomes],
                      "trace": events.trace}))


if __name__ == "__main__":
    main()
