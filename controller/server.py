"""The controller's HTTP surface: probes, status, metrics, the git webhook, and sync / suspend / resume.

`make_app` builds the FastAPI application around a running controller (anything shaped like
`ControllerHandle`) and its `Metrics`; `serve` runs it with uvicorn on a background thread. Reads (probes,
status, metrics) need no credentials. Calls that change the controller's state need the bearer token and
are refused outright when none is configured. The webhook is authenticated by the git host's signature
over the raw body, checked before the body is parsed, and only ever queues a reconcile: what gets applied
is still what the controller reads from git. specs/http.md is the reference for every endpoint.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, Self
from urllib.parse import parse_qs

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from controller.metrics import Metrics

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # 1 MiB: a push of a few hundred commits is well under; anything bigger is not a push
MAX_CLOCK_SKEW = 300  # seconds a signed GitLab delivery's timestamp may be from our clock (replay window)
MAX_REASON = 500
_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # SHA-1 and SHA-256 object names
_ZERO_SHA = re.compile(r"0{40}|0{64}")


class ControllerHandle(Protocol):
    """What the HTTP surface needs of the controller. Every method must return promptly: they are called
    while a client waits."""

    @property
    def branch(self) -> str:
        """The branch the controller follows (a webhook push to any other branch is ignored)."""
        ...

    def status(self) -> dict[str, Any]:
        """The JSON-able status of every program."""
        ...

    def ready(self) -> tuple[bool, str]:
        """Ready once the first reconcile finished and the database answers; the text says why not."""
        ...

    def live(self) -> tuple[bool, str]:
        """The reconcile loop's thread is alive and not wedged; the text says why not."""
        ...

    def request_sync(self, reason: str, revision: str | None = None) -> None:
        """Queue a reconcile without waiting for it; `revision` is the commit a webhook announced."""
        ...

    def suspend(self, reason: str) -> None: ...

    def resume(self) -> None: ...


class Refused(Exception):
    """A request answered with an error status and `{"error": message}`."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


class Ignored(Exception):
    """A well-formed, authentic delivery that asks for nothing: answered 202 `{"ignored": why}`."""


def make_app(
    ctrl: ControllerHandle,
    metrics: Metrics,
    *,
    token: str | None,
    webhook_secret: str | None,
    gitlab_token: str | None = None,
) -> FastAPI:
    """The controller's HTTP application.

    `token`: the bearer token for POST /sync, /suspend and /resume (None or empty: those are refused).
    `webhook_secret`: the key of GitHub's `X-Hub-Signature-256` and of GitLab's signed deliveries, and
    GitLab's `X-Gitlab-Token` unless `gitlab_token` is given (GitLab keeps its secret token and its signing
    token apart). With neither secret the webhook is disabled.
    """
    # The interactive docs and the OpenAPI schema are off: this is an operations port, and the schema
    # would advertise the write endpoints to anyone who can reach it.
    app = FastAPI(title="vmflow controller", docs_url=None, redoc_url=None, openapi_url=None)
    verifier = WebhookVerifier(webhook_secret or None, gitlab_token or None)
    bearer = token or None

    @app.exception_handler(Refused)
    async def _refused(_: Request, exc: Refused) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        return JSONResponse({"error": message.lower()}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": "invalid request"}, status_code=400)

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the log (Starlette re-raises after this answer and the server logs it),
        # never to the client.
        return JSONResponse({"error": "internal error (see the controller's log)"}, status_code=500)

    # ------------------------------------------------------------------------------------ reads

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        return _probe(ctrl.live)

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        return _probe(ctrl.ready)

    @app.get("/metrics")
    def metrics_text() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/status")
    def status() -> JSONResponse:
        return JSONResponse(ctrl.status())

    # ------------------------------------------------------------------------ state changes

    @app.post("/sync")
    async def sync(request: Request) -> JSONResponse:
        _authorize(request, bearer)
        reason = _reason(await _optional_json(request), "manual: POST /sync")
        await run_in_threadpool(ctrl.request_sync, reason)
        return JSONResponse({"queued": True, "reason": reason}, status_code=202)

    @app.post("/suspend")
    async def suspend(request: Request) -> JSONResponse:
        _authorize(request, bearer)
        reason = _reason(await _optional_json(request), "suspended through POST /suspend")
        await run_in_threadpool(ctrl.suspend, reason)
        return JSONResponse({"suspended": True, "reason": reason})

    @app.post("/resume")
    async def resume(request: Request) -> JSONResponse:
        _authorize(request, bearer)
        await run_in_threadpool(ctrl.resume)
        return JSONResponse({"suspended": False})

    # ------------------------------------------------------------------------------ webhook

    @app.post("/hooks/git")
    async def git_hook(request: Request) -> JSONResponse:
        if verifier.disabled:
            raise Refused(401, "the webhook is disabled: start the controller with a webhook secret")
        raw = await _read_body(request)
        headers = request.headers
        try:
            sender = verifier.verify(headers, raw)
        except Refused as exc:
            client = request.client.host if request.client else "unknown"
            log.warning("webhook delivery from %s refused: %s", client, exc.message)
            raise
        try:
            if sender == "github":
                event = headers.get("x-github-event", "")
                if event == "ping":
                    return JSONResponse({"pong": True})
                if event != "push":
                    raise Ignored(f"GitHub event `{event}` is not a push")
                payload = _github_payload(raw, headers.get("content-type", ""))
                pusher = _dig(payload, "pusher", "name") or _dig(payload, "sender", "login")
            else:
                event = headers.get("x-gitlab-event", "")
                if event != "Push Hook":
                    raise Ignored(f"GitLab event `{event}` is not a push")
                payload = _json_object(raw)
                pusher = payload.get("user_username") or payload.get("user_name")
            sha, branch = _push(payload, ctrl.branch)
        except Ignored as why:
            return JSONResponse({"ignored": str(why)}, status_code=202)
        reason = f"webhook: push to {branch} by {_printable(pusher) or 'unknown'}"
        await run_in_threadpool(ctrl.request_sync, reason, sha)
        return JSONResponse({"queued": sha}, status_code=202)

    return app


# ------------------------------------------------------------------------------------ webhook auth


class WebhookVerifier:
    """Tells whether a delivery comes from the git host, from its headers and its raw body."""

    def __init__(self, secret: str | None, gitlab_token: str | None) -> None:
        self.secret = secret
        self.gitlab_token = gitlab_token or secret
        # GitLab's signing tokens follow Standard Webhooks: `whsec_` then the base64 of the key itself.
        self.signing_key = _signing_key(secret) if secret else None

    @property
    def disabled(self) -> bool:
        return self.secret is None and self.gitlab_token is None

    def verify(self, headers: Mapping[str, str], raw: bytes) -> str:
        """The sender of an authentic delivery, `github` or `gitlab`; raises Refused(401) otherwise."""
        if "x-hub-signature-256" in headers or "x-github-event" in headers:
            self._github(headers.get("x-hub-signature-256"), raw)
            return "github"
        if "webhook-signature" in headers or "webhook-id" in headers or "webhook-timestamp" in headers:
            self._gitlab_signed(headers, raw)
            return "gitlab"
        if "x-gitlab-token" in headers or "x-gitlab-event" in headers:
            self._gitlab_token(headers.get("x-gitlab-token"))
            return "gitlab"
        raise Refused(
            401,
            "missing signature: expected X-Hub-Signature-256 (GitHub), webhook-signature or X-Gitlab-Token (GitLab)",
        )

    def _github(self, header: str | None, raw: bytes) -> None:
        if self.secret is None:
            raise Refused(401, "GitHub deliveries are disabled: start the controller with a webhook secret")
        if not header:
            raise Refused(401, "missing X-Hub-Signature-256: set the webhook's secret on GitHub")
        scheme, _, given = header.partition("=")
        if scheme != "sha256":
            raise Refused(401, "invalid X-Hub-Signature-256: expected `sha256=<hex>`")
        expected = hmac.new(self.secret.encode(), raw, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode(), given.strip().lower().encode()):
            raise Refused(401, "invalid signature")

    def _gitlab_token(self, given: str | None) -> None:
        if self.gitlab_token is None:
            raise Refused(401, "GitLab token deliveries are disabled: start the controller with a GitLab token")
        if not given:
            raise Refused(401, "missing X-Gitlab-Token: set the webhook's secret token on GitLab")
        if not hmac.compare_digest(given.encode(), self.gitlab_token.encode()):
            raise Refused(401, "invalid X-Gitlab-Token")

    def _gitlab_signed(self, headers: Mapping[str, str], raw: bytes) -> None:
        if self.signing_key is None:
            raise Refused(401, "signed GitLab deliveries are disabled: start the controller with a webhook secret")
        msg_id = headers.get("webhook-id")
        stamp = headers.get("webhook-timestamp")
        signatures = headers.get("webhook-signature")
        if not (msg_id and stamp and signatures):
            raise Refused(401, "a signed delivery needs webhook-id, webhook-timestamp and webhook-signature")
        try:
            sent = int(stamp)
        except ValueError:
            raise Refused(401, "invalid webhook-timestamp: expected Unix seconds") from None
        # The timestamp is signed, so a captured delivery can be replayed only within this window.
        if abs(time.time() - sent) > MAX_CLOCK_SKEW:
            raise Refused(401, "webhook-timestamp is more than 5 minutes from the controller's clock")
        signed = msg_id.encode() + b"." + stamp.encode() + b"." + raw
        expected = hmac.new(self.signing_key, signed, hashlib.sha256).digest()
        # The header may carry several space-separated signatures (while a key is being rotated); one
        # matching is enough.
        for entry in signatures.split():
            version, _, value = entry.partition(",")
            if version != "v1":
                continue
            try:
                given = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                continue
            if hmac.compare_digest(expected, given):
                return
        raise Refused(401, "invalid signature")


def _signing_key(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except (binascii.Error, ValueError):
            pass
    return secret.encode()


# ---------------------------------------------------------------------------------- push payloads


def _github_payload(raw: bytes, content_type: str) -> dict[str, Any]:
    # GitHub can send the JSON form-encoded as `payload=...` (the hook's content type setting); the
    # signature covers the encoded body, which was checked already. A JSON body sent with the form content
    # type (curl's default for -d) is still JSON.
    form = content_type.split(";")[0].strip().lower() == "application/x-www-form-urlencoded"
    if form and raw.startswith(b"payload="):
        try:
            fields = parse_qs(raw.decode("utf-8"), strict_parsing=True)
        except (UnicodeDecodeError, ValueError):
            raise Refused(400, "malformed form body") from None
        if len(fields.get("payload", ())) != 1:
            raise Refused(400, "form body without a `payload` field")
        return _json_object(fields["payload"][0].encode())
    return _json_object(raw)


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise Refused(400, "malformed JSON body") from None
    except RecursionError:
        # A megabyte of `[` parses into arrays nested deeper than Python's stack; no push looks like that.
        raise Refused(400, "malformed JSON body: nested too deeply") from None
    if not isinstance(value, dict):
        raise Refused(400, "the JSON body must be an object")
    return value


def _push(payload: Mapping[str, Any], following: str) -> tuple[str, str]:
    """(commit, branch) of a push to the followed branch; Ignored for any other push."""
    ref = payload.get("ref")
    if ref is None or ref == "":
        raise Refused(400, "push event without `ref`")
    if not isinstance(ref, str):
        raise Refused(400, f"`ref` must be a string, not {_json_type(ref)}")
    # The answer quotes what the sender wrote, with control characters escaped and not all of a huge one.
    if not ref.startswith("refs/heads/"):
        raise Ignored(f"`{_escaped(ref)}` is not a branch")
    branch = ref.removeprefix("refs/heads/")
    following = following.removeprefix("refs/heads/")
    if branch != following:
        raise Ignored(f"push to `{_escaped(branch)}`; the controller follows `{following}`")
    after = payload.get("after")
    if after is None:
        raise Refused(400, "push event without `after`")
    if not isinstance(after, str):
        raise Refused(400, f"`after` must be a string, not {_json_type(after)}")
    if payload.get("deleted") is True or _ZERO_SHA.fullmatch(after):
        raise Ignored(f"branch `{branch}` was deleted")
    if not _SHA.fullmatch(after):
        raise Refused(400, "`after` is not a commit id")
    return after, branch


def _json_type(value: object) -> str:
    """What a JSON value is, in JSON's words."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), "null")


def _dig(payload: Mapping[str, Any], *keys: str) -> Any:
    value: Any = payload
    for key in keys:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _printable(value: object, limit: int = 100) -> str:
    # The text ends up in logs and status; a control character there could forge a log line.
    if not isinstance(value, str):
        return ""
    return "".join(ch for ch in value if ch.isprintable())[:limit]


def _escaped(value: str, limit: int = 100) -> str:
    """A sender's string in an answer: control characters written as escapes (so `main\\n` does not read as
    `main`), and not all of a huge one."""
    shown = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in value[:limit])
    return shown + ("…" if len(value) > limit else "")


# ------------------------------------------------------------------------------------------ helpers


def _probe(check: Callable[[], tuple[bool, str]]) -> JSONResponse:
    try:
        ok, why = check()
    except Exception as exc:  # a probe that raises is a failed probe, not a crashed endpoint
        log.error("health check raised", exc_info=exc)
        ok, why = False, f"the check raised {type(exc).__name__}"
    if ok:
        return JSONResponse({"ok": True})
    return JSONResponse({"ok": False, "error": why or "not ok"}, status_code=503)


def _authorize(request: Request, token: str | None) -> None:
    if token is None:
        raise Refused(
            403, "this controller accepts no commands: start it with an API token to allow sync, suspend and resume"
        )
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    challenge = {"WWW-Authenticate": "Bearer"}
    if scheme.lower() != "bearer" or not given:
        raise Refused(401, "missing bearer token: send `Authorization: Bearer <token>`", challenge)
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Refused(401, "invalid bearer token", challenge)


async def _read_body(request: Request) -> bytes:
    # Read at most MAX_BODY bytes, whatever Content-Length claims (it may be absent, chunked, or a lie).
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise Refused(413, f"body larger than {MAX_BODY} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise Refused(413, f"body larger than {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _optional_json(request: Request) -> dict[str, Any]:
    raw = await _read_body(request)
    if not raw.strip():
        return {}
    return _json_object(raw)


def _reason(body: Mapping[str, Any], default: str) -> str:
    unknown = sorted(set(body) - {"reason"})
    if unknown:
        raise Refused(400, f"unknown field `{unknown[0]}`: the body may hold only `reason`")
    reason = body.get("reason", default)
    if not isinstance(reason, str):
        raise Refused(400, "`reason` must be a non-empty string")
    if len(reason) > MAX_REASON:
        raise Refused(400, f"`reason` is longer than {MAX_REASON} characters")
    # Control characters are dropped before the emptiness check: a reason of only those says nothing.
    reason = _printable(reason, MAX_REASON).strip()
    if not reason:
        raise Refused(400, "`reason` must be a non-empty string")
    return reason


# ------------------------------------------------------------------------------------------ serving


class ListenError(OSError):
    """The HTTP port cannot be opened: the address does not resolve, the port is taken or not ours to bind.
    The message names the address and says why."""


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` (`127.0.0.1:8787`, `[::1]:8787`, `:8787` for 127.0.0.1) as (host, port); ValueError says
    what is wrong with it."""
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        raise ValueError(f"`{text}` is not HOST:PORT (e.g. 127.0.0.1:8787)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"`{text}` is not HOST:PORT: write an IPv6 address in brackets, e.g. [::1]:8787")
    if not port:
        raise ValueError(f"`{text}` is not HOST:PORT: the port is missing")
    if not port.isascii() or not port.isdigit():
        raise ValueError(f"`{text}` is not HOST:PORT: the port `{port}` is not a number")
    if int(port) > 65535:
        raise ValueError(f"`{text}` is not HOST:PORT: the port {port} is beyond 65535")
    if not host.strip() and host:
        raise ValueError(f"`{text}` is not HOST:PORT: the host is blank")
    return host or "127.0.0.1", int(port)


def check_listen(host: str, port: int) -> None:
    """Raise ListenError when `serve` could not listen on host:port now: a name that does not resolve, a port
    in use or one that needs privileges. Nothing stays bound."""
    sock = _bind(host, port)
    sock.close()


def _bind(host: str, port: int) -> socket.socket:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ListenError(f"cannot listen on {where}: the host `{host}` does not resolve ({exc})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    return sock


class ServerHandle:
    """A running HTTP server: where it listens, and how to stop it."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, host: str, port: int) -> None:
        self._server = server
        self._thread = thread
        self.port = port
        self.url = f"http://{host}:{port}"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting connections, let requests in flight finish, and join the server's thread."""
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def serve(app: FastAPI, host: str, port: int) -> ServerHandle:
    """Run `app` on host:port in a daemon thread and return once it accepts connections.

    Port 0 picks a free port (`.port` says which). The socket is bound here, in the caller's thread, so an
    address already in use raises ListenError (an OSError) from this call rather than dying quietly in the
    thread. An IPv6 host may come in brackets, as it is written in `--listen`.
    """
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    sock = _bind(host, port)
    family = sock.family
    try:
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    bound_host, bound_port = sock.getsockname()[:2]
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,  # the controller configures logging; uvicorn must not replace it
        access_log=False,  # probes every few seconds would drown the log
        timeout_graceful_shutdown=5,
        server_header=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"vmflow-http-{bound_port}", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        server.should_exit = True
        thread.join(5)
        sock.close()
        raise RuntimeError(f"the HTTP server on {host}:{bound_port} did not start")
    return ServerHandle(server, thread, _url_host(bound_host, family), bound_port)


def _url_host(bound: str, family: int) -> str:
    # A wildcard address listens everywhere but is not somewhere to connect to: name the loopback.
    if bound in ("0.0.0.0", ""):
        return "127.0.0.1"
    if bound == "::":
        return "[::1]"
    return f"[{bound}]" if family == socket.AF_INET6 else bound
