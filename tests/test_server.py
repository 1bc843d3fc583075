"""The controller's HTTP surface (controller/server.py) and its metrics (controller/metrics.py).

The controller is a small fake implementing ControllerHandle: the HTTP layer's contract is which calls
reach it, with what, and which never do.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import urllib.request
from typing import Any

import pytest
from fastapi.testclient import TestClient

from controller.metrics import ACTIONS, MORPH_OUTCOMES, RESULTS, SYNC_STATUSES, Metrics
from controller.plan import Action
from controller.server import ControllerHandle, make_app, serve

TOKEN = "s3cret-token"
SECRET = "hook-secret"
SHA = "9fceb02d0ae598e95dc970b74767f19372d61af8"


class FakeController:
    def __init__(self) -> None:
        self.branch = "main"
        self.syncs: list[tuple[str, str | None]] = []
        self.suspended: list[str] = []
        self.resumed = 0
        self.is_live: tuple[bool, str] = (True, "")
        self.is_ready: tuple[bool, str] = (False, "first reconcile has not finished")

    def status(self) -> dict[str, Any]:
        return {"programs": [{"name": "web", "sync": "Synced", "revision": SHA}]}

    def ready(self) -> tuple[bool, str]:
        return self.is_ready

    def live(self) -> tuple[bool, str]:
        return self.is_live

    def request_sync(self, reason: str, revision: str | None = None) -> None:
        self.syncs.append((reason, revision))

    def suspend(self, reason: str) -> None:
        self.suspended.append(reason)

    def resume(self) -> None:
        self.resumed += 1


def _typed(ctrl: FakeController) -> ControllerHandle:
    return ctrl  # the fake satisfies the protocol (checked by type checkers)


@pytest.fixture
def ctrl() -> FakeController:
    return FakeController()


def client_for(ctrl: FakeController, **kw: Any) -> TestClient:
    kw.setdefault("token", TOKEN)
    kw.setdefault("webhook_secret", SECRET)
    return TestClient(make_app(_typed(ctrl), Metrics(), **kw), raise_server_exceptions=False)


@pytest.fixture
def client(ctrl: FakeController) -> TestClient:
    return client_for(ctrl)


def github_push(ref: str = "refs/heads/main", after: str = SHA, **extra: Any) -> bytes:
    payload = {"ref": ref, "before": "0" * 40, "after": after, "pusher": {"name": "alice"}, **extra}
    return json.dumps(payload).encode()


def gitlab_push(ref: str = "refs/heads/main", after: str = SHA) -> bytes:
    return json.dumps({"object_kind": "push", "ref": ref, "after": after, "user_username": "bob"}).encode()


def gh_sign(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def gh_headers(body: bytes, event: str = "push", secret: str = SECRET) -> dict[str, str]:
    return {"X-GitHub-Event": event, "X-Hub-Signature-256": gh_sign(body, secret), "Content-Type": "application/json"}


def gl_signed_headers(body: bytes, key: bytes = SECRET.encode(), stamp: int | None = None) -> dict[str, str]:
    msg_id = "msg_2b1f"
    ts = str(int(time.time()) if stamp is None else stamp)
    digest = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return {
        "X-Gitlab-Event": "Push Hook",
        "webhook-id": msg_id,
        "webhook-timestamp": ts,
        "webhook-signature": "v1," + base64.b64encode(digest).decode(),
    }


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ------------------------------------------------------------------------------------------ reads


def test_healthz_follows_liveness(client: TestClient, ctrl: FakeController) -> None:
    r = client.get("/healthz")
    assert (r.status_code, r.json()) == (200, {"ok": True})
    ctrl.is_live = (False, "reconcile loop stuck for 620 s")
    r = client.get("/healthz")
    assert r.status_code == 503
    assert r.json() == {"ok": False, "error": "reconcile loop stuck for 620 s"}


def test_readyz_follows_readiness(client: TestClient, ctrl: FakeController) -> None:
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["error"] == "first reconcile has not finished"
    ctrl.is_ready = (True, "")
    assert client.get("/readyz").json() == {"ok": True}


def test_a_probe_that_raises_is_a_failed_probe(client: TestClient, ctrl: FakeController) -> None:
    def boom() -> tuple[bool, str]:
        raise RuntimeError("database is locked")

    ctrl.live = boom  # type: ignore[method-assign]
    r = client.get("/healthz")
    assert r.status_code == 503
    assert "RuntimeError" in r.json()["error"]


def test_status_is_the_controllers_status(client: TestClient) -> None:
    r = client.get("/status")
    assert r.status_code == 200
    assert r.json() == {"programs": [{"name": "web", "sync": "Synced", "revision": SHA}]}


def test_reads_need_no_token(ctrl: FakeController) -> None:
    c = client_for(ctrl, token=None, webhook_secret=None)
    for path in ("/healthz", "/status", "/metrics"):
        assert c.get(path).status_code == 200, path


def test_metrics_endpoint_serves_prometheus_text(ctrl: FakeController) -> None:
    metrics = Metrics()
    metrics.reconciled("web", "synced", 0.4, {"create": 2}, 0, 0, SHA, "Synced")
    c = TestClient(make_app(ctrl, metrics, token=TOKEN, webhook_secret=SECRET))
    r = c.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert 'vmflow_changes_applied_total{action="create",program="web"} 2.0' in r.text


def test_an_internal_error_is_json_without_a_traceback(client: TestClient, ctrl: FakeController) -> None:
    def broken() -> dict[str, Any]:
        raise KeyError("secret internals")

    ctrl.status = broken  # type: ignore[method-assign]
    r = client.get("/status")
    assert r.status_code == 500
    assert r.json() == {"error": "internal error (see the controller's log)"}
    assert "Traceback" not in r.text and "secret internals" not in r.text


def test_unknown_paths_and_methods_are_json_errors(client: TestClient) -> None:
    r = client.get("/nope")
    assert (r.status_code, r.json()) == (404, {"error": "not found"})
    r = client.get("/sync")
    assert r.status_code == 405 and "error" in r.json()
    assert "POST" in r.headers["allow"]


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_no_docs_or_schema(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 404


# ------------------------------------------------------------------------------- state changes


def test_sync_with_the_token_queues_a_reconcile(client: TestClient, ctrl: FakeController) -> None:
    r = client.post("/sync", headers=auth())
    assert r.status_code == 202
    assert r.json()["queued"] is True
    assert ctrl.syncs == [("manual: POST /sync", None)]


def test_sync_takes_a_reason(client: TestClient, ctrl: FakeController) -> None:
    r = client.post("/sync", headers=auth(), json={"reason": "after the switch firmware update"})
    assert r.status_code == 202
    assert ctrl.syncs == [("after the switch firmware update", None)]


def test_suspend_and_resume(client: TestClient, ctrl: FakeController) -> None:
    r = client.post("/suspend", headers=auth(), json={"reason": "maintenance on rack1"})
    assert (r.status_code, r.json()) == (200, {"suspended": True, "reason": "maintenance on rack1"})
    assert ctrl.suspended == ["maintenance on rack1"]
    r = client.post("/suspend", headers=auth())
    assert r.status_code == 200 and ctrl.suspended[-1] == "suspended through POST /suspend"
    r = client.post("/resume", headers=auth())
    assert (r.status_code, r.json()) == (200, {"suspended": False})
    assert ctrl.resumed == 1


@pytest.mark.parametrize("path", ["/sync", "/suspend", "/resume"])
@pytest.mark.parametrize(
    "headers,message",
    [
        ({}, "missing bearer token"),
        ({"Authorization": "Bearer wrong"}, "invalid bearer token"),
        ({"Authorization": f"Basic {TOKEN}"}, "missing bearer token"),
        ({"Authorization": "Bearer "}, "missing bearer token"),
        ({"Authorization": "Bearer " + TOKEN + "x"}, "invalid bearer token"),
    ],
)
def test_state_changes_need_the_right_token(
    client: TestClient, ctrl: FakeController, path: str, headers: dict[str, str], message: str
) -> None:
    r = client.post(path, headers=headers)
    assert r.status_code == 401
    assert r.json()["error"].startswith(message)
    assert r.headers["www-authenticate"] == "Bearer"
    assert (ctrl.syncs, ctrl.suspended, ctrl.resumed) == ([], [], 0)


@pytest.mark.parametrize("token", [None, ""])
@pytest.mark.parametrize("path", ["/sync", "/suspend", "/resume"])
def test_state_changes_are_refused_without_a_configured_token(
    ctrl: FakeController, path: str, token: str | None
) -> None:
    c = client_for(ctrl, token=token)
    # Even a request that presents the empty token, or any token, is refused.
    for headers in ({}, auth(""), auth(TOKEN)):
        r = c.post(path, headers=headers)
        assert r.status_code == 403
        assert "start it with an API token" in r.json()["error"]
    assert (ctrl.syncs, ctrl.suspended, ctrl.resumed) == ([], [], 0)


@pytest.mark.parametrize(
    "body,status,message",
    [
        (b"{not json", 400, "malformed JSON"),
        (b"[1, 2]", 400, "must be an object"),
        (b'{"reason": 3}', 400, "`reason` must be"),
        (b'{"reason": ""}', 400, "`reason` must be"),
        (b'{"reson": "typo"}', 400, "unknown field `reson`"),
        (json.dumps({"reason": "x" * 501}).encode(), 400, "longer than 500"),
    ],
)
def test_bad_bodies_on_state_changes(
    client: TestClient, ctrl: FakeController, body: bytes, status: int, message: str
) -> None:
    r = client.post("/suspend", headers=auth(), content=body)
    assert r.status_code == status
    assert message in r.json()["error"]
    assert ctrl.suspended == []


def test_a_reason_loses_its_control_characters(client: TestClient, ctrl: FakeController) -> None:
    client.post("/sync", headers=auth(), json={"reason": "ok\n2024-01-01 forged log line"})
    assert ctrl.syncs == [("ok2024-01-01 forged log line", None)]


# ---------------------------------------------------------------------------------- webhook: GitHub


def test_github_push_queues_the_pushed_revision(client: TestClient, ctrl: FakeController) -> None:
    body = github_push()
    r = client.post("/hooks/git", content=body, headers=gh_headers(body))
    assert (r.status_code, r.json()) == (202, {"queued": SHA})
    assert ctrl.syncs == [("webhook: push to main by alice", SHA)]


def test_github_form_encoded_push(client: TestClient, ctrl: FakeController) -> None:
    from urllib.parse import urlencode

    body = urlencode({"payload": github_push().decode()}).encode()
    headers = gh_headers(body) | {"Content-Type": "application/x-www-form-urlencoded"}
    r = client.post("/hooks/git", content=body, headers=headers)
    assert (r.status_code, r.json()) == (202, {"queued": SHA})
    assert ctrl.syncs == [("webhook: push to main by alice", SHA)]


def test_json_sent_with_the_form_content_type_is_json(client: TestClient, ctrl: FakeController) -> None:
    body = github_push()  # as `curl -d` sends it
    headers = gh_headers(body) | {"Content-Type": "application/x-www-form-urlencoded"}
    assert client.post("/hooks/git", content=body, headers=headers).status_code == 202
    assert ctrl.syncs == [("webhook: push to main by alice", SHA)]


@pytest.mark.parametrize(
    "signature",
    [
        None,  # missing
        "sha256=" + "0" * 64,  # wrong
        gh_sign(b"another body"),  # valid for another body
        gh_sign(github_push(), secret="another secret"),  # another key
        "sha1=" + hashlib.sha1(b"x").hexdigest(),  # the legacy header's scheme
        "",
    ],
)
def test_github_bad_or_missing_signature_is_refused(
    client: TestClient, ctrl: FakeController, signature: str | None
) -> None:
    body = github_push()
    headers = {"X-GitHub-Event": "push"}
    if signature is not None:
        headers["X-Hub-Signature-256"] = signature
    r = client.post("/hooks/git", content=body, headers=headers)
    assert r.status_code == 401
    assert "error" in r.json()
    assert ctrl.syncs == []


def test_the_signature_is_checked_before_the_body_is_parsed(client: TestClient, ctrl: FakeController) -> None:
    body = b"{this is not json"
    wrong = {"X-GitHub-Event": "push", "X-Hub-Signature-256": gh_sign(b"x")}
    r = client.post("/hooks/git", content=body, headers=wrong)
    assert r.status_code == 401  # not 400: an unauthenticated sender learns nothing about parsing
    r = client.post("/hooks/git", content=body, headers=gh_headers(body))
    assert (r.status_code, r.json()) == (400, {"error": "malformed JSON body"})
    assert ctrl.syncs == []


def test_github_ping_answers_pong(client: TestClient, ctrl: FakeController) -> None:
    body = json.dumps({"zen": "Keep it logically awesome.", "hook_id": 1}).encode()
    r = client.post("/hooks/git", content=body, headers=gh_headers(body, event="ping"))
    assert (r.status_code, r.json()) == (200, {"pong": True})
    assert ctrl.syncs == []


def test_an_unsigned_ping_is_refused(client: TestClient) -> None:
    r = client.post("/hooks/git", content=b"{}", headers={"X-GitHub-Event": "ping"})
    assert r.status_code == 401


@pytest.mark.parametrize("event", ["issues", "pull_request", "create"])
def test_github_other_events_are_ignored(client: TestClient, ctrl: FakeController, event: str) -> None:
    body = b'{"action": "opened"}'
    r = client.post("/hooks/git", content=body, headers=gh_headers(body, event=event))
    assert r.status_code == 202
    assert event in r.json()["ignored"]
    assert ctrl.syncs == []


def test_a_push_to_another_branch_is_ignored(client: TestClient, ctrl: FakeController) -> None:
    body = github_push(ref="refs/heads/feature/bigger-web")
    r = client.post("/hooks/git", content=body, headers=gh_headers(body))
    assert r.status_code == 202
    assert r.json() == {"ignored": "push to `feature/bigger-web`; the controller follows `main`"}
    assert ctrl.syncs == []


def test_a_tag_push_is_ignored(client: TestClient, ctrl: FakeController) -> None:
    body = github_push(ref="refs/tags/main")
    r = client.post("/hooks/git", content=body, headers=gh_headers(body))
    assert r.status_code == 202 and "not a branch" in r.json()["ignored"]
    assert ctrl.syncs == []


@pytest.mark.parametrize("extra", [{"after": "0" * 40}, {"deleted": True}])
def test_a_branch_deletion_is_ignored(client: TestClient, ctrl: FakeController, extra: dict[str, Any]) -> None:
    body = github_push(**{"after": SHA} | extra)
    r = client.post("/hooks/git", content=body, headers=gh_headers(body))
    assert r.status_code == 202
    assert r.json() == {"ignored": "branch `main` was deleted"}
    assert ctrl.syncs == []


@pytest.mark.parametrize(
    "payload,message",
    [
        ({"after": SHA}, "without `ref`"),
        ({"ref": "refs/heads/main"}, "without `after`"),
        ({"ref": "refs/heads/main", "after": "HEAD~1"}, "not a commit id"),
        ([], "must be an object"),
    ],
)
def test_malformed_pushes_are_400(client: TestClient, ctrl: FakeController, payload: Any, message: str) -> None:
    body = json.dumps(payload).encode()
    r = client.post("/hooks/git", content=body, headers=gh_headers(body))
    assert r.status_code == 400
    assert message in r.json()["error"]
    assert ctrl.syncs == []


def test_the_followed_branch_may_be_a_full_ref(ctrl: FakeController) -> None:
    ctrl.branch = "refs/heads/main"
    body = github_push()
    r = client_for(ctrl).post("/hooks/git", content=body, headers=gh_headers(body))
    assert r.status_code == 202 and ctrl.syncs == [("webhook: push to main by alice", SHA)]


def test_a_body_over_1_mib_is_413(client: TestClient, ctrl: FakeController) -> None:
    body = github_push(padding="x" * (1 << 20))
    r = client.post("/hooks/git", content=body, headers=gh_headers(body))
    assert r.status_code == 413
    assert "larger than" in r.json()["error"]
    assert ctrl.syncs == []


def test_a_streamed_body_over_1_mib_is_413_without_content_length(client: TestClient, ctrl: FakeController) -> None:
    def chunks():
        for _ in range(20):
            yield b"x" * 65536

    headers = {"X-GitHub-Event": "push", "X-Hub-Signature-256": "sha256=00"}
    r = client.post("/hooks/git", content=chunks(), headers=headers)
    assert r.status_code == 413
    assert ctrl.syncs == []


def test_a_push_of_exactly_1_mib_is_accepted(client: TestClient, ctrl: FakeController) -> None:
    body = github_push(padding="")
    body = github_push(padding="x" * ((1 << 20) - len(body)))
    assert len(body) == 1 << 20
    r = client.post("/hooks/git", content=body, headers=gh_headers(body))
    assert r.status_code == 202


def test_the_webhook_is_disabled_without_a_secret(ctrl: FakeController) -> None:
    c = client_for(ctrl, webhook_secret=None)
    body = github_push()
    r = c.post("/hooks/git", content=body, headers=gh_headers(body))
    assert r.status_code == 401
    assert "webhook is disabled" in r.json()["error"]
    assert ctrl.syncs == []


def test_a_delivery_with_no_known_signature_is_refused(client: TestClient, ctrl: FakeController) -> None:
    r = client.post("/hooks/git", content=github_push(), headers={"Content-Type": "application/json"})
    assert r.status_code == 401
    assert "missing signature" in r.json()["error"]
    assert ctrl.syncs == []


# ---------------------------------------------------------------------------------- webhook: GitLab


def test_gitlab_push_with_the_token(client: TestClient, ctrl: FakeController) -> None:
    r = client.post(
        "/hooks/git", content=gitlab_push(), headers={"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": SECRET}
    )
    assert (r.status_code, r.json()) == (202, {"queued": SHA})
    assert ctrl.syncs == [("webhook: push to main by bob", SHA)]


@pytest.mark.parametrize("token", [None, "", "wrong", SECRET + " "])
def test_gitlab_wrong_or_missing_token_is_refused(client: TestClient, ctrl: FakeController, token: str | None) -> None:
    headers = {"X-Gitlab-Event": "Push Hook"}
    if token is not None:
        headers["X-Gitlab-Token"] = token
    r = client.post("/hooks/git", content=gitlab_push(), headers=headers)
    assert r.status_code == 401
    assert ctrl.syncs == []


def test_a_separate_gitlab_token(ctrl: FakeController) -> None:
    c = client_for(ctrl, gitlab_token="gl-token")
    headers = {"X-Gitlab-Event": "Push Hook"}
    for token, status in ((SECRET, 401), ("gl-token", 202)):
        r = c.post("/hooks/git", content=gitlab_push(), headers=headers | {"X-Gitlab-Token": token})
        assert r.status_code == status, token
    assert ctrl.syncs == [("webhook: push to main by bob", SHA)]


def test_a_gitlab_token_alone_enables_only_gitlab_tokens(ctrl: FakeController) -> None:
    c = client_for(ctrl, webhook_secret=None, gitlab_token="gl-token")
    headers = {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": "gl-token"}
    assert c.post("/hooks/git", content=gitlab_push(), headers=headers).status_code == 202
    body = github_push()
    r = c.post("/hooks/git", content=body, headers=gh_headers(body))
    assert r.status_code == 401 and "GitHub deliveries are disabled" in r.json()["error"]
    assert len(ctrl.syncs) == 1


def test_gitlab_signed_push(client: TestClient, ctrl: FakeController) -> None:
    body = gitlab_push()
    r = client.post("/hooks/git", content=body, headers=gl_signed_headers(body))
    assert (r.status_code, r.json()) == (202, {"queued": SHA})
    assert ctrl.syncs == [("webhook: push to main by bob", SHA)]


def test_gitlab_signed_push_with_a_whsec_signing_token(ctrl: FakeController) -> None:
    key = bytes(range(32))
    c = client_for(ctrl, webhook_secret="whsec_" + base64.b64encode(key).decode())
    body = gitlab_push()
    r = c.post("/hooks/git", content=body, headers=gl_signed_headers(body, key=key))
    assert r.status_code == 202
    assert ctrl.syncs == [("webhook: push to main by bob", SHA)]


def test_gitlab_signed_with_several_signatures_one_valid(client: TestClient, ctrl: FakeController) -> None:
    body = gitlab_push()
    headers = gl_signed_headers(body)
    headers["webhook-signature"] = "v1,AAAA v2,zzz " + headers["webhook-signature"]
    assert client.post("/hooks/git", content=body, headers=headers).status_code == 202


def _tampered_signature(body: bytes) -> dict[str, str]:
    return gl_signed_headers(body) | {"webhook-signature": "v1," + base64.b64encode(b"\0" * 32).decode()}


@pytest.mark.parametrize(
    "make_headers,message",
    [
        (lambda body: gl_signed_headers(body, stamp=int(time.time()) - 301 - 5), "more than 5 minutes"),
        (lambda body: gl_signed_headers(body, stamp=int(time.time()) + 600), "more than 5 minutes"),
        (lambda body: gl_signed_headers(body, key=b"another key"), "invalid signature"),
        (lambda body: gl_signed_headers(body + b" "), "invalid signature"),
        (_tampered_signature, "invalid signature"),
        (lambda body: gl_signed_headers(body) | {"webhook-signature": "v1,not base64!"}, "invalid signature"),
        (lambda body: gl_signed_headers(body) | {"webhook-timestamp": "yesterday"}, "invalid webhook-timestamp"),
        (lambda body: {k: v for k, v in gl_signed_headers(body).items() if k != "webhook-id"}, "needs webhook-id"),
    ],
    ids=["stale", "future", "wrong-key", "other-body", "tampered", "not-base64", "bad-timestamp", "no-id"],
)
def test_gitlab_bad_signed_deliveries_are_refused(
    client: TestClient, ctrl: FakeController, make_headers, message: str
) -> None:
    body = gitlab_push()
    r = client.post("/hooks/git", content=body, headers=make_headers(body))
    assert r.status_code == 401
    assert message in r.json()["error"]
    assert ctrl.syncs == []


def test_a_signed_gitlab_delivery_is_judged_by_its_signature(client: TestClient, ctrl: FakeController) -> None:
    body = gitlab_push()
    headers = gl_signed_headers(body, key=b"another key") | {"X-Gitlab-Token": SECRET}
    assert client.post("/hooks/git", content=body, headers=headers).status_code == 401
    assert ctrl.syncs == []


def test_gitlab_other_branch_and_other_events(client: TestClient, ctrl: FakeController) -> None:
    body = gitlab_push(ref="refs/heads/dev")
    r = client.post("/hooks/git", content=body, headers=gl_signed_headers(body))
    assert r.status_code == 202 and "dev" in r.json()["ignored"]
    body = b'{"object_kind": "merge_request"}'
    headers = gl_signed_headers(body) | {"X-Gitlab-Event": "Merge Request Hook"}
    r = client.post("/hooks/git", content=body, headers=headers)
    assert r.status_code == 202 and "Merge Request Hook" in r.json()["ignored"]
    body = gitlab_push(after="0" * 40)
    r = client.post("/hooks/git", content=body, headers={"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": SECRET})
    assert r.status_code == 202 and "deleted" in r.json()["ignored"]
    assert ctrl.syncs == []


def test_gitlab_malformed_json_is_400(client: TestClient, ctrl: FakeController) -> None:
    body = b'{"ref": "refs/heads/main", '
    r = client.post("/hooks/git", content=body, headers=gl_signed_headers(body))
    assert r.status_code == 400
    assert ctrl.syncs == []


# ------------------------------------------------------------------------------------------ metrics


def test_metrics_names_after_each_method() -> None:
    m = Metrics(clock=lambda: 1700000000.0)
    m.reconciled("web", "synced", 2.5, {"create": 2, Action.UPDATE_LIVE: 1, "delete": 0}, 1, 3, SHA, "Synced")
    m.suspended_set("web", True)
    m.morph_event("web", "web-1", "fired")
    m.sampled(0.2)
    body, content_type = m.render()
    text = body.decode()
    assert content_type.startswith("text/plain")
    for line in [
        'vmflow_reconcile_duration_seconds_bucket{le="5.0",program="web",result="synced"} 1.0',
        'vmflow_reconcile_duration_seconds_bucket{le="600.0",program="web",result="synced"} 1.0',
        'vmflow_reconciles_total{program="web",result="synced"} 1.0',
        'vmflow_reconciles_total{program="web",result="failed"} 0.0',
        'vmflow_changes_applied_total{action="create",program="web"} 2.0',
        'vmflow_changes_applied_total{action="update-live",program="web"} 1.0',
        'vmflow_changes_applied_total{action="delete",program="web"} 0.0',
        'vmflow_rollbacks_total{program="web"} 1.0',
        'vmflow_drifted_vms{program="web"} 3.0',
        'vmflow_last_success_timestamp_seconds{program="web"} 1.7e+09',
        f'vmflow_revision_info{{program="web",revision="{SHA}"}} 1.0',
        'vmflow_sync_status{program="web",status="Synced"} 1.0',
        'vmflow_sync_status{program="web",status="OutOfSync"} 0.0',
        'vmflow_sync_status{program="web",status="Unknown"} 0.0',
        'vmflow_suspended{program="web"} 1.0',
        'vmflow_morph_events_total{outcome="fired",program="web",vm="web-1"} 1.0',
        'vmflow_morph_events_total{outcome="skipped-cooldown",program="web",vm="web-1"} 0.0',
        "vmflow_monitor_sample_seconds_count 1.0",
    ]:
        assert line in text, line
    assert "_created" not in text  # one series per label set, not two
    m.suspended_set("web", False)
    assert 'vmflow_suspended{program="web"} 0.0' in m.render()[0].decode()


def test_revision_info_keeps_only_the_current_revision() -> None:
    m = Metrics()
    other = "1" * 40
    m.reconciled("web", "synced", 1, {}, 0, 0, SHA, "Synced")
    m.reconciled("db", "synced", 1, {}, 0, 0, SHA, "Synced")
    m.reconciled("web", "synced", 1, {}, 0, 0, other, "Synced")
    text = m.render()[0].decode()
    assert f'vmflow_revision_info{{program="web",revision="{other}"}} 1.0' in text
    assert f'vmflow_revision_info{{program="web",revision="{SHA}"}}' not in text
    assert f'vmflow_revision_info{{program="db",revision="{SHA}"}} 1.0' in text
    # A reconcile that never reached a revision keeps the last one.
    m.reconciled("web", "failed", 1, {}, 0, 0, None, "Unknown")
    text = m.render()[0].decode()
    assert f'vmflow_revision_info{{program="web",revision="{other}"}} 1.0' in text
    assert text.count('vmflow_revision_info{program="web"') == 1


def test_sync_status_moves_and_failure_keeps_the_last_success_time() -> None:
    now = [100.0]
    m = Metrics(clock=lambda: now[0])
    m.reconciled("web", "noop", 0.05, {}, 0, 0, SHA, "Synced")
    now[0] = 200.0
    m.reconciled("web", "failed", 3, {}, 2, 1, SHA, "OutOfSync")
    text = m.render()[0].decode()
    assert 'vmflow_sync_status{program="web",status="OutOfSync"} 1.0' in text
    assert 'vmflow_sync_status{program="web",status="Synced"} 0.0' in text
    assert 'vmflow_last_success_timestamp_seconds{program="web"} 100.0' in text
    assert 'vmflow_reconciles_total{program="web",result="failed"} 1.0' in text
    assert 'vmflow_rollbacks_total{program="web"} 2.0' in text


@pytest.mark.parametrize("result", RESULTS)
@pytest.mark.parametrize("sync", SYNC_STATUSES)
def test_every_result_and_sync_status_is_accepted(result: str, sync: str) -> None:
    m = Metrics()
    m.reconciled("web", result, 1, dict.fromkeys(ACTIONS, 1), 0, 0, SHA, sync)
    assert f'vmflow_reconciles_total{{program="web",result="{result}"}} 1.0' in m.render()[0].decode()


@pytest.mark.parametrize("outcome", MORPH_OUTCOMES)
def test_every_morph_outcome_is_accepted(outcome: str) -> None:
    m = Metrics()
    m.morph_event("web", "web-1", outcome)
    assert f'vmflow_morph_events_total{{outcome="{outcome}",program="web",vm="web-1"}} 1.0' in m.render()[0].decode()


def test_plan_actions_are_the_metric_actions() -> None:
    assert sorted(a.value for a in Action if a.value != "no-op") == sorted(ACTIONS)
    m = Metrics()
    m.reconciled("web", "noop", 0.01, {Action.NOOP: 3}, 0, 0, None, "Synced")
    assert 'action="no-op"' not in m.render()[0].decode()


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.reconciled("web", "ok", 1, {}, 0, 0, None, "Synced"),
        lambda m: m.reconciled("web", "synced", 1, {"destroy": 1}, 0, 0, None, "Synced"),
        lambda m: m.reconciled("web", "synced", 1, {}, 0, 0, None, "synced"),
        lambda m: m.morph_event("web", "web-1", "done"),
    ],
)
def test_unknown_label_values_are_refused(call) -> None:
    with pytest.raises(ValueError, match="unknown"):
        call(Metrics())


def test_two_metrics_objects_do_not_share_counts() -> None:
    a, b = Metrics(), Metrics()
    a.reconciled("web", "synced", 1, {}, 0, 0, None, "Synced")
    assert 'program="web"' in a.render()[0].decode()
    assert 'program="web"' not in b.render()[0].decode()


def test_forget_drops_every_series_of_a_program() -> None:
    m = Metrics()
    for program in ("web", "db"):
        m.reconciled(program, "synced", 1, {"create": 1}, 1, 1, SHA, "Synced")
        m.suspended_set(program, False)
        m.morph_event(program, "vm-1", "applied")
    m.forget("web")
    text = m.render()[0].decode()
    assert 'program="web"' not in text
    assert 'program="db"' in text
    m.forget("web")  # forgetting twice is harmless


# ------------------------------------------------------------------------------------ real server


def test_serve_on_a_free_port_answers_and_stops(ctrl: FakeController) -> None:
    handle = serve(make_app(ctrl, Metrics(), token=None, webhook_secret=None), "127.0.0.1", 0)
    try:
        assert handle.port > 0
        assert handle.url == f"http://127.0.0.1:{handle.port}"
        with urllib.request.urlopen(handle.url + "/healthz", timeout=5) as r:
            assert r.status == 200
            assert json.loads(r.read()) == {"ok": True}
    finally:
        handle.stop()
    assert not handle._thread.is_alive()
    with pytest.raises(OSError):
        urllib.request.urlopen(handle.url + "/healthz", timeout=2)


def test_serve_on_a_port_in_use_raises(ctrl: FakeController) -> None:
    app = make_app(ctrl, Metrics(), token=None, webhook_secret=None)
    with serve(app, "127.0.0.1", 0) as first, pytest.raises(OSError):
        serve(app, "127.0.0.1", first.port)
