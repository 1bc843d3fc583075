"""The controller on a real git repository in a temporary folder, reconciling the embedded default.

Each test commits to the repository and calls `reconcile_once` the way the service loop does, then checks
the VMs (through a fresh libvirt connection on the embedded state) and the status document. The last
tests run the real `vmflow controller` process: the watcher, the webhook, SIGTERM and `kill -9`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import libvirt
import pytest

from controller import embedded
from controller.gitsource import GitSource
from controller.hypervisor import Hypervisor
from controller.reconcile import Reconciler, Settings, TemporaryError
from controller.store import Store
from tests.cli_runner import ROOT, TWO_VMS, vmflow
from tests.gitrepo import Keys, Repo

PROGRAM = "apps/web/web.flow"


def _rec(repo: Repo, state: Path, **settings) -> Reconciler:
    source = GitSource(str(repo.path), "main", "apps/web", cache_dir=state / "git")
    return Reconciler(source, Store(state / "vmflow.db"), state, settings=Settings(**settings))


def _vms(state: Path) -> dict:
    with Hypervisor(embedded.uri(state)) as hv:
        return hv.observe(snapshots=False).vms


def _with_cpu(text: str, web_cpu: str) -> str:
    return text.replace("cpu    = 2 .. 8", f"cpu    = {web_cpu}", 1)


@pytest.fixture
def setup(tmp_path):
    repo = Repo(tmp_path / "infra")
    first = repo.commit({PROGRAM: TWO_VMS}, "two VMs")
    state = tmp_path / "state"
    rec = _rec(repo, state)
    yield repo, state, rec, first
    rec.close()


def test_a_commit_that_changes_cpu_is_applied_and_status_says_synced(setup):
    repo, state, rec, first = setup
    out = rec.reconcile_once()
    assert out.result == "synced" and out.revision == first
    assert _vms(state)["web"].vcpus == 2
    second = repo.commit({PROGRAM: _with_cpu(TWO_VMS, "4 .. 8")}, "web: 4 vCPUs")
    out = rec.reconcile_once(trigger="test")
    assert (out.result, out.changes) == ("synced", {"update-live": 1})
    assert _vms(state)["web"].vcpus == 4
    st = rec.status()
    assert st["sync"] == "Synced" and st["health"] == "Healthy"
    assert st["revisions"]["last_applied"] == second == st["revisions"]["observed"]
    assert _vms(state)["web"].owner.revision == second
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] is True and ready["reason"] == "ReconciliationSucceeded"
    # Level-triggered and idempotent: once more changes nothing.
    assert rec.reconcile_once().result == "noop"
    history = rec.store.history("web")
    assert [h.revision for h in history] == [second, first]
    doc = json.loads(vmflow("status", "--state-dir", str(state), "--format", "json").stdout)
    assert doc["format_version"] == 1 and doc["programs"]["web"]["revisions"]["last_applied"] == second
    assert [e["outcome"] for e in doc["events"]["web"]][:2] == ["applied", "applying"]
    listed = vmflow("history", "--state-dir", str(state))
    assert listed.returncode == 0 and f"{second[:12]}" in listed.stdout and "update-live vm.web" in listed.stdout
    assert history[0].summary["changes"][0] == {"address": "vm.web", "action": "update-live", "result": "applied",
                                                "seconds": history[0].summary["changes"][0]["seconds"],
                                                "detail": None}


def test_a_syntax_error_stalls_keeping_the_last_good_revision_and_a_fix_recovers(setup):
    repo, state, rec, first = setup
    rec.reconcile_once()
    broken = repo.commit({PROGRAM: TWO_VMS.replace("cpu    = 2 .. 8", "cpu    = 4 .. 8\n  memory = = 3", 1)},
                         "broken")
    out = rec.reconcile_once()
    assert out.result == "stalled"
    st = rec.status()
    assert st["revisions"]["last_applied"] == first and st["revisions"]["failed"] == broken
    stalled = next(c for c in st["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] is True and stalled["reason"] == "BuildFailed"
    diag = st["last_error"]["diagnostics"][0]
    assert diag["file"] == PROGRAM and diag["line"] == 11 and diag["code"].startswith("F1")
    assert _vms(state)["web"].vcpus == 2  # nothing applied
    # Not retried in a loop: a resync of the same broken head changes nothing and stays stalled.
    assert rec.reconcile_once(trigger="resync").result == "stalled"
    fixed = repo.commit({PROGRAM: _with_cpu(TWO_VMS, "4 .. 8")}, "fixed")
    out = rec.reconcile_once()
    assert out.result == "synced"
    st = rec.status()
    assert st["revisions"]["last_applied"] == fixed and st["revisions"]["failed"] is None
    assert st["last_error"] is None and st["sync"] == "Synced"
    assert not next(c for c in st["conditions"] if c["type"] == "Stalled")["status"]
    assert _vms(state)["web"].vcpus == 4


def _drift_behind_our_back(state: Path, vcpus: int) -> None:
    """Change `web` through libvirt itself, as an operator with virsh would, and persist the test driver."""
    with Hypervisor(embedded.uri(state)) as hv:
        dom = hv.conn.lookupByName("web")
        dom.setVcpusFlags(vcpus, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        embedded.save(state, hv.export())


def test_drift_is_reported_and_reverted_only_with_self_heal(setup):
    repo, state, rec, first = setup
    rec.reconcile_once()
    time.sleep(0.01)  # a new mtime for the node file
    _drift_behind_our_back(state, 6)
    out = rec.reconcile_once(trigger="resync")
    assert out.result == "out-of-sync" and out.drifted == 1
    st = rec.status()
    assert st["sync"] == "OutOfSync"
    assert {"address": "vm.web", "path": "cpu", "applied": 2, "actual": 6} in st["drift"]
    assert next(c for c in st["conditions"] if c["type"] == "Ready")["reason"] == "DriftDetected"
    assert _vms(state)["web"].vcpus == 6  # reported, not reverted
    rec.settings.self_heal = True
    out = rec.reconcile_once(trigger="resync")
    assert out.result == "synced"
    assert _vms(state)["web"].vcpus == 2
    assert rec.status()["sync"] == "Synced"


def test_prune_deletes_only_owned_vms_and_only_when_enabled(setup):
    repo, state, rec, first = setup
    rec.reconcile_once()
    with Hypervisor(embedded.uri(state)) as hv:  # a domain vmflow does not own
        hv.conn.defineXML("<domain type='test'><name>keepme</name><memory>65536</memory><vcpu>1</vcpu>"
                          "<os><type>hvm</type></os></domain>")
        embedded.save(state, hv.export())
    only_web = TWO_VMS[: TWO_VMS.index("vm api")]
    repo.commit({PROGRAM: only_web}, "api removed")
    out = rec.reconcile_once()
    assert out.result == "out-of-sync"
    st = rec.status()
    assert "vm.api" in st["pending"]
    assert next(c for c in st["conditions"] if c["type"] == "Ready")["reason"] == "PruneRequired"
    assert set(_vms(state)) == {"web", "api"}
    rec.settings.prune = True
    out = rec.reconcile_once()
    assert out.result == "synced" and out.changes == {"delete": 1}
    assert set(_vms(state)) == {"web"}
    with Hypervisor(embedded.uri(state)) as hv:
        assert "keepme" in {u.name for u in hv.observe().unmanaged}


def test_rollback_applies_the_old_revision_and_holds_it_until_the_next_commit(setup):
    repo, state, rec, first = setup
    rec.reconcile_once()
    second = repo.commit({PROGRAM: _with_cpu(TWO_VMS, "4 .. 8")}, "4 vCPUs")
    rec.reconcile_once()
    r = vmflow("rollback", first[:10], "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    assert "held there until a commit after" in r.stdout
    assert _vms(state)["web"].vcpus == 2
    # The controller's next reconcile keeps the rollback: the head has not moved.
    out = rec.reconcile_once(trigger="resync")
    assert out.result == "noop" and out.revision == first
    st = rec.status()
    assert st["pin"]["revision"] == first and st["revisions"]["last_applied"] == first
    assert _vms(state)["web"].vcpus == 2
    status = vmflow("status", "--state-dir", str(state), "--no-color")
    assert "pinned" in status.stdout and first[:12] in status.stdout
    # A new commit lifts the pin and is applied.
    third = repo.commit({PROGRAM: _with_cpu(TWO_VMS, "3 .. 8")}, "3 vCPUs")
    out = rec.reconcile_once()
    assert out.result == "synced" and out.revision == third
    assert rec.status()["pin"] is None and _vms(state)["web"].vcpus == 3
    assert second != third


def test_a_failed_revision_is_tried_once(setup, monkeypatch):
    repo, state, rec, first = setup
    rec.reconcile_once()
    repo.commit({PROGRAM: _with_cpu(TWO_VMS, "4 .. 8")}, "4 vCPUs")
    calls = []

    def broken(self, name, count, live):  # a fault at our own adapter boundary
        calls.append(name)
        from controller.hypervisor import HypervisorError

        raise HypervisorError("set vcpus", "injected failure")

    monkeypatch.setattr(Hypervisor, "set_vcpus", broken)
    out = rec.reconcile_once()
    assert out.result == "failed" and calls
    n = len(calls)
    assert rec.reconcile_once(trigger="resync").result == "out-of-sync"
    assert len(calls) == n  # not retried
    st = rec.status()
    assert st["revisions"]["failed"] == repo.head() and "not retried" in st["conditions"][0]["message"]
    monkeypatch.undo()
    assert rec.reconcile_once(trigger="sync", retry_failed=True).result == "synced"


def test_suspend_applies_nothing_until_resume(setup):
    repo, state, rec, first = setup
    rec.reconcile_once()
    assert vmflow("suspend", "--state-dir", str(state)).returncode == 0
    repo.commit({PROGRAM: _with_cpu(TWO_VMS, "4 .. 8")}, "4 vCPUs")
    assert rec.reconcile_once().result == "suspended"
    assert _vms(state)["web"].vcpus == 2
    assert vmflow("resume", "--state-dir", str(state)).returncode == 0
    assert rec.reconcile_once().result == "synced"
    assert _vms(state)["web"].vcpus == 4


def test_unreachable_corrupt_and_unrelated_sources_keep_the_last_good_state(setup, tmp_path):
    repo, state, rec, first = setup
    rec.reconcile_once()
    # Force-pushed with unrelated history: refused, retried, nothing deleted.
    repo.git("checkout", "-q", "--orphan", "other")
    repo.git("read-tree", "--empty")
    (repo.path / "apps/web").mkdir(parents=True, exist_ok=True)
    (repo.path / PROGRAM).write_text("# nothing here\n")
    repo.git("add", "-A")
    repo.git("commit", "-q", "-m", "unrelated")
    repo.git("branch", "-M", "other", "main")
    with pytest.raises(TemporaryError) as e:
        rec.reconcile_once()
    assert e.value.reason == "UnrelatedHistory"
    assert set(_vms(state)) == {"web", "api"}
    st = rec.status()
    assert st["revisions"]["last_applied"] == first and "force-pushed" in st["last_error"]["message"]
    # Corrupt: an object of the head commit is gone.
    objects = repo.path / ".git" / "objects"
    head = repo.head()
    (objects / head[:2] / head[2:]).unlink()
    with pytest.raises(TemporaryError) as e:
        rec.reconcile_once()
    assert e.value.reason == "SourceUnavailable"
    assert set(_vms(state)) == {"web", "api"}
    # Unreachable remote: the same.
    remote = tmp_path / "gone.git"
    source = GitSource(f"file://{remote}", "main", "apps/web", cache_dir=state / "git")
    rec2 = Reconciler(source, rec.store, state)
    with pytest.raises(TemporaryError) as e:
        rec2.reconcile_once()
    assert e.value.reason == "SourceUnavailable"
    assert set(_vms(state)) == {"web", "api"}


def test_with_signature_checks_only_commits_signed_by_a_trusted_key_are_applied(tmp_path):
    keys = Keys()
    try:
        trusted_fpr, stranger_fpr = keys.make("Ops <ops@example.com>"), keys.make("Mallory <m@example.com>")
        trusted = tmp_path / "trusted"
        keys.export(trusted_fpr, trusted)
        repo = Repo(tmp_path / "infra")
        unsigned = repo.commit({PROGRAM: TWO_VMS}, "unsigned")
        state = tmp_path / "state"
        rec = _rec(repo, state, verify_signatures=True, trusted_keys=trusted)
        out = rec.reconcile_once()
        assert out.result == "stalled" and out.revision == unsigned
        st = rec.status()
        assert st["last_error"]["reason"] == "UntrustedRevision"
        assert st["last_error"]["message"].endswith("the commit is not signed")
        assert _vms(state) == {}
        good = keys.signed_commit(repo, trusted_fpr, {}, "signed by ops")
        assert rec.reconcile_once().result == "synced"
        assert rec.status()["revisions"]["last_applied"] == good and set(_vms(state)) == {"web", "api"}
        keys.signed_commit(repo, stranger_fpr, {PROGRAM: _with_cpu(TWO_VMS, "4 .. 8")}, "signed by someone else")
        out = rec.reconcile_once()
        assert out.result == "stalled" and "not trusted" in rec.status()["last_error"]["message"]
        assert _vms(state)["web"].vcpus == 2 and rec.status()["revisions"]["last_applied"] == good
        rec.close()
    finally:
        keys.close()


def test_temporary_errors_are_retried_with_growing_backoff_and_nothing_is_deleted(setup, tmp_path, caplog):
    import logging
    import threading

    from controller.service import Config, Controller

    repo, state, rec, first = setup
    rec.reconcile_once()
    rec.close()
    cfg = Config(repo=str(repo.path), path="apps/web", state_dir=state, listen=None, resync=0.05,
                 backoff_base=0.05, backoff_max=0.4, watch=False)
    ctrl = Controller(cfg)
    (repo.path / ".git").rename(tmp_path / "git-away")  # the repository breaks while the controller runs
    caplog.set_level(logging.WARNING, logger="vmflow")
    stopper = threading.Timer(2.0, ctrl.stop)  # the loop runs in this (main) thread: it installs signal handlers
    stopper.start()
    assert ctrl.run() == 0
    retries = [r for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) >= 3
    delays = [float(r.getMessage().split("retrying in ")[1].rstrip("s")) for r in retries]
    assert delays[:4] == sorted(delays[:4]) and delays[3] >= 4 * delays[0]  # doubling, with ±10% jitter
    assert max(delays) <= 0.45  # capped
    st = Store(state / "vmflow.db").get_status("web")
    assert st["revisions"]["last_applied"] == first
    assert st["last_error"]["reason"] == "SourceUnavailable"
    assert set(_vms(state)) == {"web", "api"}


def test_controller_options_come_from_a_config_file_and_the_environment(setup, tmp_path):
    repo, state, rec, first = setup
    rec.close()
    cfg = tmp_path / "controller.yaml"
    cfg.write_text(f"repo: {repo.path}\npath: apps/web\nstate_dir: {state}\nself_heal: true\n")
    r = vmflow("controller", "--config", str(cfg), "--once", env={"VMFLOW_PRUNE": "1"})
    assert r.returncode == 0, r.stderr
    st = Store(state / "vmflow.db").get_status("web")
    assert st["self_heal"] is True and st["prune"] is True and st["revisions"]["last_applied"] == first
    cfg.write_text("repo: x\nself-heel: true\n")
    r = vmflow("controller", "--config", str(cfg), "--once")
    assert r.returncode == 64 and "unknown key `self_heel`; did you mean `self_heal`?" in r.stderr


# ---------------------------------------------------------------------------------------- the real process


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(repo: Repo, state: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), VMFLOW_WEBHOOK_SECRET="s3cret", VMFLOW_TOKEN="tok")
    p = subprocess.Popen([sys.executable, "-m", "controller.cli", "controller", "--repo", str(repo.path),
                          "--path", "apps/web", "--state-dir", str(state), "--listen", f"127.0.0.1:{port}",
                          "--log-format", "json", *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    _wait(lambda: _get(port, "/readyz")[0] == 200, 30, p)
    return p, port


def _get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {}
    except OSError:
        return 0, {}


def _post(port: int, path: str, body: bytes, headers: dict) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _wait(cond, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the controller exited {proc.returncode}: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def _status(port: int) -> dict:
    return _get(port, "/status")[1]["status"]


def test_the_controller_process_watches_commits_answers_webhooks_and_stops_on_sigterm(setup):
    repo, state, rec, first = setup
    rec.close()
    p, port = _start(repo, state, "--resync", "600", "--poll", "600")
    try:
        assert _status(port)["revisions"]["last_applied"] == first
        # The watcher: a commit is applied without any poll.
        second = repo.commit({PROGRAM: _with_cpu(TWO_VMS, "4 .. 8")}, "4 vCPUs")
        _wait(lambda: _status(port)["revisions"]["last_applied"] == second, 10, p)
        # The webhook: bad signatures are refused and change nothing; a good one triggers a reconcile.
        _drift_behind_our_back(state, 7)  # something for a reconcile to find
        body = json.dumps({"ref": "refs/heads/main", "after": second, "pusher": {"name": "ada"}}).encode()
        for sig in (None, "sha256=" + "0" * 64):
            headers = {"X-GitHub-Event": "push", "Content-Type": "application/json"}
            if sig:
                headers["X-Hub-Signature-256"] = sig
            assert _post(port, "/hooks/git", body, headers) == 401
        time.sleep(0.5)
        assert _status(port)["sync"] == "Synced"  # no reconcile ran, so the drift is not seen yet
        good = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
        assert _post(port, "/hooks/git", body, {"X-GitHub-Event": "push", "X-Hub-Signature-256": good}) == 202
        _wait(lambda: _status(port)["sync"] == "OutOfSync", 10, p)
        assert _vms(state)["web"].vcpus == 7  # reported, not reverted: self-heal is off
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        assert 'vmflow_drifted_vms{program="web"} 1.0' in metrics
        assert "vmflow_reconcile_duration_seconds_count" in metrics
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(r["msg"] == "controller stopping" for r in lines)
    assert any(r["msg"] == "reconciled" and r.get("result") == "synced" for r in lines)


def test_kill_9_mid_apply_recovers_from_the_journal_and_converges(setup, tmp_path):
    repo, state, rec, first = setup
    rec.reconcile_once()
    rec.close()
    repo.commit({PROGRAM: _with_cpu(TWO_VMS, "4 .. 8").replace("cpu    = 1 .. 4", "cpu    = 2 .. 4")}, "both")
    # The driver runs one reconcile and SIGKILLs itself right after the first journal intent.
    driver = ROOT / "tests" / "controller_kill_driver.py"
    r = subprocess.run([sys.executable, str(driver), "kill", str(repo.path), "apps/web", str(state)], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    store = Store(state / "vmflow.db")
    assert store.unfinished(), "the kill should leave a journal intent open"
    store.close()
    r = vmflow("controller", "--repo", str(repo.path), "--path", "apps/web", "--state-dir", str(state), "--once")
    assert r.returncode == 0, r.stderr
    store = Store(state / "vmflow.db")
    assert not store.unfinished()
    assert any(e.outcome == "recovered" for e in store.events("web"))
    assert "interrupted" in [h.result for h in store.history("web")]
    vms = _vms(state)
    assert (vms["web"].vcpus, vms["api"].vcpus) == (4, 2)
    assert store.get_status("web")["sync"] == "Synced"


def test_sigterm_mid_apply_finishes_the_change_in_flight_and_starts_no_other(setup):
    repo, state, rec, first = setup
    rec.reconcile_once()
    rec.close()
    second = repo.commit({PROGRAM: _with_cpu(TWO_VMS, "4 .. 8").replace("cpu    = 1 .. 4", "cpu    = 2 .. 4")},
                         "both")
    driver = ROOT / "tests" / "controller_kill_driver.py"
    r = subprocess.run([sys.executable, str(driver), "term", str(repo.path), "apps/web", str(state)], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    store = Store(state / "vmflow.db")
    assert not store.unfinished()  # the journal is consistent: no intent left open
    last = store.history("web")[0]
    assert [c["result"] for c in last.summary["changes"]] == ["applied", "not-started"]
    vms = _vms(state)
    assert (vms["api"].vcpus, vms["web"].vcpus) == (2, 2)  # api (first in order) done, web not started
    st = store.get_status("web")
    assert st["revisions"]["last_applied"] == first and st["revisions"]["failed"] is None
    assert "stopped during revision" in st["last_error"]["message"]
    store.close()
    # The next run picks the revision up again: it was interrupted, not failed.
    r = vmflow("controller", "--repo", str(repo.path), "--path", "apps/web", "--state-dir", str(state), "--once")
    assert r.returncode == 0, r.stderr
    vms = _vms(state)
    assert (vms["api"].vcpus, vms["web"].vcpus) == (2, 4)
    assert Store(state / "vmflow.db").get_status("web")["revisions"]["last_applied"] == second
