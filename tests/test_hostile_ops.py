"""Hostile input to the controller-side commands: `controller`, `status`, `history`, `events`, `rollback`,
`sync`, `suspend`, `resume`, `plan --base`, `simulate`, and the HTTP endpoints.

Each case gives the command something wrong (a repository that is not there, a config file that is not
YAML, a listen address that cannot be, a damaged state database, a revision that cannot be rolled back to,
a trace with impossible numbers, a webhook body built to hurt) and checks what the user gets: one `error:`
line that says what is wrong and where, the documented exit code (1 for bad input or a failed command, 64
for a bad command line), no traceback, and nothing written or half-applied.

Most cases run the real entry point (`controller.cli.main`) in this process, which is what `vmflow` runs,
so that the file stays fast; the ones where success would start a service run the real process.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from controller import embedded
from controller import simulate as sim
from controller.gitsource import GitSource
from controller.hypervisor import Hypervisor, HypervisorError
from controller.reconcile import Reconciler, TemporaryError, control_key
from controller.store import Store
from tests.cli_runner import ROOT, TWO_VMS, vmflow
from tests.gitrepo import Repo

PROGRAM = "apps/web/web.flow"
TRACE_HEADER = ("timestamp_s,cpu_cores,cpu_capacity_mhz,cpu_usage_mhz,mem_capacity_kb,mem_usage_kb,"
                "disk_read_kbps,disk_write_kbps,net_rx_kbps,net_tx_kbps\n")
ROW = "4,10400,2288.0,8388608,3774873,120.0,335.0,916.0,528.0"


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def run(*args: str) -> Run:
    """`vmflow ARGS` through the real entry point, in this process (exit code, standard output and error)."""
    from controller import cli

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["vmflow", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return Run(code, out.getvalue(), err.getvalue())


def refused(r: Run, code: int, *needles: str) -> str:
    """The command failed with `code`, one line of error naming what is wrong, and no traceback."""
    assert r.returncode == code, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.lower().startswith("error:")]
    assert len(errors) == 1, r.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ a repository


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Repo:
    """`main`: two VMs, then a commit that does not compile, then its fix; `other`: unrelated history."""
    r = Repo(tmp_path_factory.mktemp("git") / "infra")
    r.first = r.commit({PROGRAM: TWO_VMS}, "two VMs")
    r.bad = r.commit({"apps/web/broken.flow": "vm broken {\n"}, "does not compile")
    r.fixed = r.commit({"apps/web/broken.flow": None}, "fix")
    r.git("checkout", "-q", "--orphan", "other")
    r.git("read-tree", "--empty")
    r.unrelated = r.commit({PROGRAM: TWO_VMS.replace("vm api", "vm db")}, "another repository")
    r.git("checkout", "-q", "-f", "main")
    return r


@pytest.fixture
def state(repo: Repo, tmp_path: Path) -> Path:
    """A state folder where the controller applied the branch head."""
    folder = tmp_path / "state"
    rec = Reconciler(GitSource(str(repo.path), "main", "apps/web"), Store(folder / "vmflow.db"), folder)
    assert rec.reconcile_once().result == "synced"
    rec.store.close()
    rec.close()
    return folder


def _status(state: Path) -> dict:
    store = Store(state / "vmflow.db")
    try:
        return store.get_status("web")
    finally:
        store.close()


def _pin(state: Path):
    store = Store(state / "vmflow.db")
    try:
        return store.get_doc(control_key("web"), {}).get("pin")
    finally:
        store.close()


def _vms(state: Path) -> dict:
    with Hypervisor(embedded.uri(state)) as hv:
        return {n: (v.vcpus, v.owner.revision if v.owner else None) for n, v in hv.observe(snapshots=False).vms.items()}


# ------------------------------------------------------------------------------------------ vmflow controller


@pytest.mark.parametrize("case, needle", [
    ("missing", "`{tmp}/nope` does not exist"),
    ("file", "is a file, not a folder"),
    ("not-git", "is not a git repository"),
    ("subfolder", "give --repo {repo} --path apps/web"),
    ("empty", "it has no branches: nothing was committed yet"),
    ("branch", "branch `nope` does not exist"),
    ("traversal", "leaves the repository"),
    ("absolute", "is absolute"),
    ("path-missing", "--path `apps/nothere` does not exist"),
], ids=["missing", "file", "not-git", "subfolder", "empty", "branch", "traversal", "absolute", "path-missing"])
def test_controller_refuses_a_source_that_is_not_there_and_writes_nothing(repo, tmp_path, case, needle):
    (tmp_path / "a-file").write_text("not a repository\n")
    (tmp_path / "plain").mkdir()
    Repo(tmp_path / "empty")
    source = {"missing": ["--repo", str(tmp_path / "nope")],
              "file": ["--repo", str(tmp_path / "a-file")],
              "not-git": ["--repo", str(tmp_path / "plain")],
              "subfolder": ["--repo", str(repo.path / "apps"), "--path", "web"],
              "empty": ["--repo", str(tmp_path / "empty")],
              "branch": ["--repo", str(repo.path), "--branch", "nope"],
              "traversal": ["--repo", str(repo.path), "--path", "../../etc"],
              "absolute": ["--repo", str(repo.path), "--path", "/etc"],
              "path-missing": ["--repo", str(repo.path), "--path", "apps/nothere"]}[case]
    r = run("controller", *source, "--once", "--state-dir", str(tmp_path / "state"))
    refused(r, 1, needle.format(tmp=tmp_path, repo=repo.path))
    assert not (tmp_path / "state").exists()  # a typo leaves no status document of a program that is not there


def test_a_path_naming_a_file_is_the_program_of_its_folder(repo, tmp_path):
    r = run("controller", "--repo", str(repo.path), "--path", PROGRAM, "--once", "--state-dir", str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    store = Store(tmp_path / "s" / "vmflow.db")
    assert list(store.all_status()) == ["web"]  # the owner `vmflow apply apps/web/web.flow` would record
    store.close()


@pytest.mark.parametrize("text, needle", [
    ("repo: [unclosed\n", "controller.yaml:2:1: not valid YAML"),
    ("- a\n- b\n", "controller.yaml:1:1: must hold a mapping"),
    ("repo: /srv\npoll: fast\n", "controller.yaml:2:7: `poll`: 'fast' is not a valid float"),
    ("repo: /srv\nresync: -1\n", "controller.yaml:2:9: `resync`: -1"),
    ("repo: [1, 2]\n", "controller.yaml:1:7: `repo` must be a single value, not a list"),
    ("repo: /srv\nbranch:\n", "controller.yaml:2:8: `branch` has no value"),
    ("repo: /srv\nkeep_snapshots: 1e999\n", "`keep_snapshots`"),
    (b"\xff\xfe\x00repo", "controller.yaml: not UTF-8 text"),
    ("repo: /srv\nself-heel: true\n", "controller.yaml:2:1: unknown key `self_heel`; did you mean `self_heal`?"),
], ids=["yaml", "list", "poll", "resync", "repo-list", "null", "huge", "binary", "unknown"])
def test_a_bad_config_file_is_a_usage_error_that_says_where(tmp_path, text, needle):
    cfg = tmp_path / "controller.yaml"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    r = run("controller", "--config", str(cfg), "--once", "--state-dir", str(tmp_path / "state"))
    refused(r, 64, needle)
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("listen, needle", [
    (":::", "write an IPv6 address in brackets"),
    ("host:99999", "the port 99999 is beyond 65535"),
    ("127.0.0.1:abc", "the port `abc` is not a number"),
    ("127.0.0.1:", "the port is missing"),
    ("nocolon", "is not HOST:PORT"),
], ids=["ipv6-bare", "port-too-big", "port-text", "port-missing", "no-colon"])
def test_listen_garbage_is_a_usage_error(repo, tmp_path, listen, needle):
    r = run("controller", "--repo", str(repo.path), "--listen", listen, "--state-dir", str(tmp_path / "s"))
    refused(r, 64, needle)
    assert not (tmp_path / "s").exists()


def test_a_port_in_use_or_a_host_that_does_not_resolve_fails_at_once(repo, tmp_path):
    # The real process: were the address accepted, the service would start and run until the timeout.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for listen, needle in ((f"127.0.0.1:{port}", "Address already in use"),
                               ("nosuchhost.invalid:8787", "does not resolve")):
            r = vmflow("controller", "--repo", str(repo.path), "--path", "apps/web", "--listen", listen,
                       "--state-dir", str(tmp_path / "s"), "--no-watch", timeout=30)
            refused(Run(r.returncode, r.stdout, r.stderr), 1, f"cannot listen on {listen}", needle)
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------ the state folder

STATE_COMMANDS = [("status",), ("history",), ("events",), ("rollback", "HEAD"), ("sync",), ("suspend",), ("resume",)]


@pytest.mark.parametrize("command", STATE_COMMANDS, ids=lambda c: c[0])
def test_commands_without_a_state(tmp_path, command):
    refused(run(*command, "--state-dir", str(tmp_path / "none")), 1, "no vmflow state in")
    (tmp_path / "empty").mkdir()
    refused(run(*command, "--state-dir", str(tmp_path / "empty")), 1, "no vmflow state in")
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize("command", [*STATE_COMMANDS, ("controller", "--repo", ".", "--once")], ids=lambda c: c[0])
def test_a_state_folder_that_is_a_file_is_a_usage_error(tmp_path, command):
    (tmp_path / "state").write_text("not a folder\n")
    refused(run(*command, "--state-dir", str(tmp_path / "state")), 64, "is a file")
    assert (tmp_path / "state").read_text() == "not a folder\n"


@pytest.mark.parametrize("command", STATE_COMMANDS, ids=lambda c: c[0])
def test_a_corrupt_database_is_named_and_left_alone(tmp_path, command):
    db = tmp_path / "state" / "vmflow.db"
    db.parent.mkdir()
    db.write_bytes(os.urandom(16384))
    before = _digest(db)
    refused(run(*command, "--state-dir", str(db.parent)), 1, f"the state database `{db}` cannot be used")
    assert _digest(db) == before


def test_the_controller_on_a_corrupt_database(repo, tmp_path):
    db = tmp_path / "state" / "vmflow.db"
    db.parent.mkdir()
    db.write_bytes(b"SQLite format 3\x00" + os.urandom(8192))
    before = _digest(db)
    r = run("controller", "--repo", str(repo.path), "--path", "apps/web", "--once", "--state-dir", str(db.parent))
    refused(r, 1, "cannot be used")
    assert _digest(db) == before


def _damage_status(state: Path, doc: str) -> None:
    import sqlite3

    with contextlib.closing(sqlite3.connect(state / "vmflow.db")) as c:
        c.execute("UPDATE status SET doc=?", (doc,))
        c.commit()


@pytest.mark.parametrize("command", [c for c in STATE_COMMANDS if c[0] not in ("history", "events")],
                         ids=lambda c: c[0])
def test_a_status_document_that_is_not_json(state, command):
    _damage_status(state, "{not json")
    refused(run(*command, "--state-dir", str(state)), 1, "is damaged")
    assert _pin(state) is None


@pytest.mark.parametrize("command, needle", [(("status",), "it is a JSON list, not an object"),
                                             (("rollback", "HEAD"), "is damaged"),
                                             (("sync",), "is damaged")], ids=lambda c: c[0])
def test_a_status_document_that_is_not_an_object(state, command, needle):
    _damage_status(state, "[1]")
    refused(run(*command, "--state-dir", str(state)), 1, needle)


def test_the_controller_writes_a_damaged_status_afresh(repo, state):
    _damage_status(state, "{not json")
    r = run("controller", "--repo", str(repo.path), "--path", "apps/web", "--once", "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    assert "was damaged" in r.stderr and "Traceback" not in r.stderr
    st = _status(state)
    assert st["sync"] == "Synced" and st["revisions"]["last_applied"] == repo.fixed
    events = json.loads(run("events", "--state-dir", str(state), "-f", "json").stdout)["events"]
    assert any(e["outcome"] == "recovered" and "damaged" in e["message"] for e in events)


# ------------------------------------------------------------------------------------------ rollback


@pytest.mark.parametrize("case, needle", [
    ("unknown", "unknown revision `deadbeef`"),
    ("does-not-compile", "the program does not compile at"),
    ("unrelated", "shares no history with the applied revision"),
    ("option", "`-x` is not a revision"),
], ids=["unknown", "does-not-compile", "unrelated", "option"])
def test_a_rollback_that_cannot_be_applied_pins_nothing(repo, state, case, needle):
    rev = {"unknown": "deadbeef", "does-not-compile": repo.bad, "unrelated": repo.unrelated, "option": "-x"}[case]
    before = (_status(state)["revisions"], _vms(state))
    args = ("rollback", "--state-dir", str(state), "--", rev) if case == "option" else \
        ("rollback", rev, "--state-dir", str(state))
    r = run(*args)
    line = refused(r, 1, needle, "nothing was changed")
    assert _pin(state) is None and _status(state)["pin"] is None
    assert (_status(state)["revisions"], _vms(state)) == before, line
    if case == "does-not-compile":
        assert "apps/web/broken.flow:2:1: error[F107]" in r.stderr  # the diagnostics, with where


def test_a_rollback_while_another_apply_holds_the_lock(repo, state):
    import socket as sock

    store = Store(state / "vmflow.db")
    # Held by a live process of this host (pid 1 is always there), doing something else.
    store.db.execute("INSERT INTO locks VALUES (?,?,?,?,?,?)", ("web", "vmflow controller", 1, sock.gethostname(),
                                                                 0.0, "reconcile 123456 (test)"))
    before = (_status(state)["revisions"], _vms(state))
    r = run("rollback", repo.first, "--state-dir", str(state), "--lock-timeout", "0.2")
    refused(r, 1, "another apply of `web` is running", "not applied, and the program is not pinned to it")
    assert _pin(state) is None and _status(state)["pin"] is None
    assert (_status(state)["revisions"], _vms(state)) == before
    events = store.events(program="web", limit=5)
    assert [e.outcome for e in events][:2] == ["failed", "pinned"]
    assert not [e for e in events if e.outcome == "retry"]  # the wait itself writes nothing
    store.close()


def test_negative_lock_timeout_is_a_usage_error(state):
    refused(run("sync", "--state-dir", str(state), "--lock-timeout", "-1"), 64, "-1")


# ------------------------------------------------------------------------------------------ plan --base


def test_plan_base_on_shallow_damaged_and_odd_revisions(repo, tmp_path):
    shallow = tmp_path / "shallow"
    subprocess.run(["git", "clone", "-q", "--depth", "1", "--branch", "main", f"file://{repo.path}", str(shallow)],
                   check=True, capture_output=True, env=repo.env)
    refused(run("plan", str(shallow / "apps/web"), "--base", "HEAD~1"), 1, "unknown revision `HEAD~1`",
            "shallow clone", "--unshallow")
    refused(run("plan", str(repo.path / "apps/web"), "--base", "HEAD:apps"), 1, "`HEAD:apps` names a tree")
    blob = repo.git("rev-parse", f"{repo.first}:{PROGRAM}")
    refused(run("plan", str(repo.path / "apps/web"), "--base", blob), 1, "names a blob, not a commit")
    refused(run("plan", str(repo.path / "apps/web"), "--base", "a" * 5000), 1, "is not a revision")
    # Damaged: the base's commit object is cut short.
    broken = tmp_path / "broken"
    shutil.copytree(repo.path, broken)
    obj = broken / ".git" / "objects" / repo.first[:2] / repo.first[2:]
    obj.chmod(0o644)
    obj.write_bytes(obj.read_bytes()[:10])
    refused(run("plan", str(broken / "apps/web"), "--base", repo.first), 1, "is damaged")


# ------------------------------------------------------------------------------------------ simulate

SIM = ("simulate", "examples/simulate")


def _trace(tmp_path: Path, name: str, body: str | bytes) -> Path:
    f = tmp_path / name
    f.write_bytes(body if isinstance(body, bytes) else body.encode())
    return f


@pytest.mark.parametrize("body, needle", [
    ("", "is empty"),
    (TRACE_HEADER, "holds no samples"),
    ("a,b,c\n1,2,3\n", ":1:1: the trace has no `timestamp_s` column"),
    ("timestamp_s,trace_id\n0,x\n", ":1:1: the trace has no metric column"),
    (TRACE_HEADER + f"abc,{ROW}\n", ":2:1: `timestamp_s` is `abc`, not a number"),
    (TRACE_HEADER + f"nan,{ROW}\n", ":2:1: `timestamp_s` is `nan`, not a finite number"),
    (TRACE_HEADER + f",{ROW}\n", ":2:1: `timestamp_s` is empty"),
    (TRACE_HEADER + "0,4,10400,x,8388608,3774873,1,2,3,4\n", ":2:11: `cpu_usage_mhz` is `x`, not a number"),
    (TRACE_HEADER + "0,4,10400,inf,8388608,3774873,1,2,3,4\n", "`cpu_usage_mhz` is `inf`, not a finite"),
    (TRACE_HEADER + "0,4,10400,-5,8388608,3774873,1,2,3,4\n", "`cpu_usage_mhz` is -5: a recorded amount cannot"),
    (TRACE_HEADER + "0,4,1e-308,500,8388608,3774873,1,2,3,4\n", "is not a finite percentage"),
    (TRACE_HEADER + f"0,{ROW}\n1e308,{ROW}\n", ":3:1: `timestamp_s` 1e+308 is not a time"),
    (TRACE_HEADER + f"-1e12,{ROW}\n", "`timestamp_s` -1e+12 is not a time"),
    (TRACE_HEADER + "0,1e308,10400,2288,8388608,3774873,1,2,3,4\n", "`cpu_cores` 1e+308 is more than any machine"),
    (TRACE_HEADER + f"0,{ROW}\n315360000,{ROW}\n", "would take 1,051,201 rounds"),  # ten years, 5-minute rounds
    (TRACE_HEADER + "1" * 100_000 + "\n", ":2:1: a line longer than"),
    (b"\xff\xfe\x00\x01binary", "is not UTF-8 text"),
], ids=["empty", "header-only", "no-time-column", "no-metric", "text-time", "nan-time", "no-time", "text-value",
        "inf-value", "negative", "ratio-overflow", "time-1e308", "time-negative", "cores", "ten-years", "long-line",
        "binary"])
def test_a_bad_trace_is_refused_with_where(tmp_path, body, needle):
    f = _trace(tmp_path, "t.csv", body)
    refused(run(*SIM, "--metrics", str(f), "--map", "web=t"), 1, needle)


def test_a_truncated_gzip_trace(tmp_path):
    whole = gzip.compress((ROOT / "tests/data/trace-small.csv").read_bytes())
    f = _trace(tmp_path, "t.csv.gz", whole[: len(whole) // 2])
    refused(run(*SIM, "--metrics", str(f), "--map", "web=web"), 1, f"cannot read the trace `{f}`")


def test_a_trace_that_inflates_past_the_limit_is_not_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(sim, "MAX_TRACE_BYTES", 256 * 1024)
    body = TRACE_HEADER + "".join(f"{300 * i},{ROW}\n" for i in range(20000))  # about 1.3 MB
    f = _trace(tmp_path, "t.csv.gz", gzip.compress(body.encode()))
    refused(run(*SIM, "--metrics", str(f), "--map", "web=t"), 1, "is larger than 256KiB")


def test_unsorted_duplicate_rows_and_a_trace_id_with_a_colon_are_replayed(tmp_path):
    rows = [f"a:b,{t},{ROW}" for t in (1700000600, 1700000000, 1700000300, 1700000300, 1700000900)]
    f = _trace(tmp_path, "t.csv", "trace_id," + TRACE_HEADER + "\n".join(rows) + "\n")
    r = run(*SIM, "--metrics", str(f), "--map", "web=a:b", "--format", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)["simulations"][0]
    assert doc["start_s"] == 1700000000.0 and doc["end_s"] == 1700000900.0 and doc["steps"] == 4


@pytest.mark.parametrize("args, code, needle", [
    (("--map", "web"), 64, "`web` is not VM=TRACE_ID"),
    (("--map", "=x"), 64, "`=x` is not VM=TRACE_ID"),
    (("--map", "web="), 64, "`web=` is not VM=TRACE_ID"),
    (("--map", "web=web", "--interval", "0"), 64, "`0` is neither a duration"),
    (("--map", "web=web", "--interval", "0s"), 64, "--interval wants a positive duration"),
    (("--map", "web=web", "--interval", "9" * 400 + "d"), 64, "is neither a duration"),
    (("--map", "web=web", "--start", "3h", "--end", "1h"), 1, "would end (2023-11-14T23:15:00Z) before it starts"),
    (("--map", "web=web", "--end", "99999999d"), 1, "--end 99999999d puts the simulation's end at"),
    (("--map", "web=web", "--start", "0001-01-01"), 1, "at most 200,000 are run"),
    (("--map", "web=web", "--interval", "1s", "--end", "30d"), 1, "would take 2,592,001 rounds"),
], ids=["map-no-eq", "map-no-vm", "map-no-trace", "interval-0", "interval-0s", "interval-inf", "start-after-end",
        "end-not-a-time", "start-year-1", "too-many-rounds"])
def test_simulate_command_line_extremes(args, code, needle):
    refused(run(*SIM, "--metrics", "tests/data/trace-small.csv", *args), code, needle)


# ------------------------------------------------------------------------------------------ HTTP

SECRET, TOKEN = "hook-secret", "tok"


@pytest.fixture
def http():
    import hmac

    from fastapi.testclient import TestClient

    from controller.metrics import Metrics
    from controller.server import make_app

    class Ctrl:
        branch = "main"

        def __init__(self) -> None:
            self.calls: list = []

        def status(self):
            return {}

        def ready(self):
            return True, ""

        def live(self):
            return True, ""

        def request_sync(self, reason, revision=None):
            self.calls.append(("sync", reason, revision))

        def suspend(self, reason):
            self.calls.append(("suspend", reason))

        def resume(self):
            self.calls.append(("resume",))

    ctrl = Ctrl()
    client = TestClient(make_app(ctrl, Metrics(), token=TOKEN, webhook_secret=SECRET), raise_server_exceptions=False)

    def hook(body: bytes):
        sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        return client.post("/hooks/git", content=body,
                           headers={"X-GitHub-Event": "push", "X-Hub-Signature-256": sig})

    def command(path: str, body: bytes):
        return client.post(path, content=body, headers={"Authorization": f"Bearer {TOKEN}"})

    return ctrl, hook, command


@pytest.mark.parametrize("body, status, needle", [
    (b'{"ref": "' + b"a" * (2 << 20) + b'"}', 413, "body larger than 1048576 bytes"),
    (b"[1, 2]", 400, "the JSON body must be an object"),
    (b'"refs/heads/main"', 400, "the JSON body must be an object"),
    (b"null", 400, "the JSON body must be an object"),
    (b"[" * 200_000 + b"]" * 200_000, 400, "nested too deeply"),
    (b'{"ref": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nested too deeply"),
    (b'{"after": "' + b"a" * 40 + b'"}', 400, "push event without `ref`"),
    (b'{"ref": 5}', 400, "`ref` must be a string, not a number"),
    (b'{"ref": ["refs/heads/main"]}', 400, "`ref` must be a string, not an array"),
    (b'{"ref": "refs/heads/main", "after": {}}', 400, "`after` must be a string, not an object"),
    (b'{"ref": "refs/heads/main", "after": ' + b"9" * 5000 + b"}", 400, "malformed JSON body"),
], ids=["huge", "array", "string", "null", "deep-array", "deep-ref", "no-ref", "ref-number", "ref-array",
        "after-object", "after-bigint"])
def test_hostile_webhook_bodies_get_a_json_error_and_queue_nothing(http, body, status, needle):
    ctrl, hook, _ = http
    r = hook(body)
    assert r.status_code == status and needle in r.json()["error"], r.text
    assert ctrl.calls == []


def test_a_webhook_ref_with_control_characters_is_shown_escaped(http):
    ctrl, hook, _ = http
    r = hook(json.dumps({"ref": "refs/heads/main\n", "after": "a" * 40}).encode())
    assert r.status_code == 202 and r.json()["ignored"] == "push to `main\\n`; the controller follows `main`"
    assert ctrl.calls == []


@pytest.mark.parametrize("path", ["/sync", "/suspend"])
@pytest.mark.parametrize("body, needle", [
    (b'{"reason": "\\u0000\\u0001\\n"}', "`reason` must be a non-empty string"),
    (b"[" * 200_000, "malformed JSON body"),
    (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
], ids=["control-only", "unclosed", "deep"])
def test_hostile_command_bodies(http, path, body, needle):
    ctrl, _, command = http
    r = command(path, body)
    assert r.status_code == 400 and needle in r.json()["error"], r.text
    assert ctrl.calls == []


# ------------------------------------------------------------------------------------------ libvirt failing


def test_libvirt_failing_half_way_leaves_no_open_intent_and_an_honest_status(repo, tmp_path, monkeypatch):
    """A change fails on one VM while the other applies; then libvirt goes away just after an apply.
    Neither leaves the journal open, the lock held, or the status claiming an apply is running."""
    git = Repo(tmp_path / "infra")
    git.commit({PROGRAM: TWO_VMS})
    state = tmp_path / "state"
    rec = Reconciler(GitSource(str(git.path), "main", "apps/web"), Store(state / "vmflow.db"), state)
    assert rec.reconcile_once().result == "synced"
    git.commit({PROGRAM: TWO_VMS.replace("cpu    = 2 .. 8", "cpu    = 4 .. 8").replace("cpu    = 1 .. 4",
                                                                                      "cpu    = 2 .. 4")})
    real = Hypervisor.set_vcpus

    def failing_for_api(self, name, count, live):
        if name == "api":
            raise HypervisorError("set vcpus", "injected: the host refused")
        return real(self, name, count, live)

    monkeypatch.setattr(Hypervisor, "set_vcpus", failing_for_api)
    assert rec.reconcile_once().result == "failed"
    assert rec.store.unfinished() == [] and rec.store.lock_info("web") is None
    assert _vms(state)["web"][0] == 4 and _vms(state)["api"][0] == 1
    monkeypatch.undo()

    calls = {"n": 0}
    observe = Hypervisor.observe

    def gone_after_the_apply(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 1:  # the plan's observation works; the one after the apply does not
            raise HypervisorError("observe", "connection reset by peer", temporary=True)
        return observe(self, *a, **k)

    monkeypatch.setattr(Hypervisor, "observe", gone_after_the_apply)
    with pytest.raises(TemporaryError) as e:
        rec.reconcile_once(retry_failed=True)
    assert e.value.reason == "HypervisorUnavailable"
    st = rec.status()
    assert st["health"] != "Progressing"
    assert not any(c["type"] == "Reconciling" and c["status"] for c in st["conditions"])
    assert rec.store.unfinished() == [] and rec.store.lock_info("web") is None
    monkeypatch.undo()
    assert rec.reconcile_once().result in ("synced", "noop")
    assert _vms(state)["api"][0] == 2
    rec.close()


# ------------------------------------------------------------------------------------------ the real process


def test_the_real_process_says_one_line_and_no_traceback(tmp_path):
    db = tmp_path / "state" / "vmflow.db"
    db.parent.mkdir()
    db.write_bytes(os.urandom(4096))
    r = vmflow("status", "--state-dir", str(db.parent))
    refused(Run(r.returncode, r.stdout, r.stderr), 1, "cannot be used")
    f = _trace(tmp_path, "t.csv", TRACE_HEADER + f"0,{ROW}\n1e308,{ROW}\n")
    r = vmflow(*SIM, "--metrics", str(f), "--map", "web=t", timeout=60)
    refused(Run(r.returncode, r.stdout, r.stderr), 1, "is not a time")
    r = vmflow("controller", "--repo", str(tmp_path / "nope"), "--once", "--state-dir", str(tmp_path / "s"))
    refused(Run(r.returncode, r.stdout, r.stderr), 1, "does not exist")
