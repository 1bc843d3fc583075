"""The controller's commands: `controller`, `status`, `history`, `rollback`, `sync`, `suspend`, `resume`.

They are registered on the `vmflow` group by controller/cli.py, which owns exit codes and shared options.
Every option of `vmflow controller` can also come from a `VMFLOW_*` environment variable or from a YAML
config file (`--config`); the command line wins over the environment, which wins over the file.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from pathlib import Path

import click

# Defined before the import below: `python -m controller.cli` imports this module while controller.cli is
# still loading, and that module reads COMMANDS when it is done.
COMMANDS: list = []

from controller.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, _colour, _no_color_option  # noqa: E402

_CONFIG_KEYS = {"repo", "branch", "path", "libvirt", "state_dir", "listen", "once", "poll", "resync", "self_heal",
                "prune", "allow_mass_delete", "verify_signatures", "trusted_keys", "allow_unrelated_history",
                "token", "webhook_secret", "log_format", "log_level", "image_root", "keep_snapshots",
                "parallelism", "watch", "monitor_interval", "stability", "max_morphs_per_hour",
                "morph_concurrency", "notify_url"}


def _read_config(ctx: click.Context, _param, value: Path | None):
    """`--config FILE`: YAML keys named like the long options (`self_heal: true`) become defaults.

    The file is the command line written down, so a mistake in it is a usage error (exit 64); its message
    is one line that names the file, the line and the column, and says what is wrong."""
    if value is None:
        return None
    import yaml

    def fail(message: str, node=None) -> None:
        where = f"{value}:{node.start_mark.line + 1}:{node.start_mark.column + 1}" if node is not None else f"{value}"
        click.echo(f"error: {where}: {message}", err=True)
        sys.exit(EXIT_USAGE)

    try:
        text = value.read_bytes().decode("utf-8")
    except OSError as e:
        fail(f"cannot read it: {e.strerror or e}")
    except UnicodeDecodeError as e:
        fail(f"not UTF-8 text (byte {e.start}): a config file is YAML")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        doc = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f"{value}:{mark.line + 1}:{mark.column + 1}" if mark is not None else f"{value}"
        click.echo(f"error: {at}: not valid YAML: {e.problem or e.context}", err=True)
        sys.exit(EXIT_USAGE)
    except (yaml.YAMLError, RecursionError) as e:
        fail(f"not valid YAML: {type(e).__name__}")
    if doc is None:
        doc, root = {}, None
    if not isinstance(doc, dict) or not isinstance(root, yaml.MappingNode | None):
        fail("must hold a mapping of option names to values (`repo: /srv/infra`), not "
             f"{'a list' if isinstance(doc, list) else 'a single value'}", root)
    nodes = {str(k.value).replace("-", "_"): (k, v) for k, v in (root.value if root is not None else [])}
    doc = {str(k).replace("-", "_"): v for k, v in doc.items()}
    unknown = sorted(set(doc) - _CONFIG_KEYS)
    if unknown:
        from compiler.diagnostics import did_you_mean

        hint = did_you_mean(unknown[0], sorted(_CONFIG_KEYS))
        fail(f"unknown key `{unknown[0]}`" + (f"; {hint}" if hint else ""), nodes.get(unknown[0], (None,))[0])
    # Keys are the options' names; click's defaults are keyed by parameter name.
    renamed = {"path": "subpath", "libvirt": "libvirt_uri", "watch": "no_watch"}
    params = {p.name: p for p in ctx.command.params}
    for key, v in doc.items():
        node = nodes.get(key, (None, None))[1]
        if v is None:
            fail(f"`{key}` has no value: give one, or leave the key out", node)
        if isinstance(v, dict | list):
            fail(f"`{key}` must be a single value, not {'a mapping' if isinstance(v, dict) else 'a list'}", node)
        param = params[renamed.get(key, key)]
        try:
            param.type_cast_value(ctx, v)
        except click.BadParameter as e:
            fail(f"`{key}`: {e.message}", node)
    for key, name in renamed.items():
        if key in doc:
            doc[name] = doc.pop(key)
    if "no_watch" in doc:
        doc["no_watch"] = not click.BOOL.convert(doc["no_watch"], None, ctx)
    ctx.default_map = {**(ctx.default_map or {}), **doc}
    return value


def _state_dir_option(f):
    return click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=Path(".vmflow"),
                        envvar="VMFLOW_STATE_DIR", show_default=True,
                        help="The controller's state: its database (status, history, journal, events), the "
                             "embedded hypervisor and the mirror of a remote repository.")(f)


# ------------------------------------------------------------------------------------------ controller


@click.command("controller")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), callback=_read_config,
              is_eager=True, expose_value=False, help="A YAML file of option defaults (keys as below, with _).")
@click.option("--repo", required=True, envvar="VMFLOW_REPO",
              help="The git repository: a local path, or a URL (https://, ssh://, git@host:org/repo).")
@click.option("--branch", default="main", show_default=True, envvar="VMFLOW_BRANCH")
@click.option("--path", "subpath", default="", envvar="VMFLOW_PATH",
              help="The program's folder inside the repository (default: the top).")
@click.option("--libvirt", "libvirt_uri", metavar="URI", envvar="VMFLOW_LIBVIRT",
              help="The hypervisor. Default: the host the program's pools name, else the embedded test driver.")
@_state_dir_option
@click.option("--listen", default="127.0.0.1:8787", show_default=True, envvar="VMFLOW_LISTEN",
              help="Where /healthz, /readyz, /metrics, /status and the webhook listen; `off` for none.")
@click.option("--once", is_flag=True, help="Reconcile once and exit: 0 in sync or applied, 1 failed or stalled.")
@click.option("--poll", type=click.FloatRange(0.5), envvar="VMFLOW_POLL",
              help="Seconds between fetches of the branch (with ±10%% jitter). Default: 30 for a remote, 60 for a "
                   "local repository, whose commits the watcher sees at once.")
@click.option("--resync", type=click.FloatRange(1), default=60.0, show_default=True, envvar="VMFLOW_RESYNC",
              help="Seconds between full reconciles without a new commit: how soon drift is noticed.")
@click.option("--no-watch", "no_watch", is_flag=True, help="Do not watch a local repository's refs.")
@click.option("--self-heal/--no-self-heal", default=False, show_default=True, envvar="VMFLOW_SELF_HEAL",
              help="Revert drift (changes made outside vmflow). Off: drift is reported as OutOfSync.")
@click.option("--prune/--no-prune", default=False, show_default=True, envvar="VMFLOW_PRUNE",
              help="Delete VMs this program owns but no longer declares.")
@click.option("--allow-mass-delete", is_flag=True, envvar="VMFLOW_ALLOW_MASS_DELETE",
              help="With --prune, allow deleting more than half of the program's VMs in one revision.")
@click.option("--verify-signatures", is_flag=True, envvar="VMFLOW_VERIFY_SIGNATURES",
              help="Apply only commits signed by a key in --trusted-keys.")
@click.option("--trusted-keys", type=click.Path(exists=True, file_okay=False, path_type=Path),
              envvar="VMFLOW_TRUSTED_KEYS", help="A folder of OpenPGP public keys (*.asc, *.gpg, *.pub).")
@click.option("--allow-unrelated-history", is_flag=True, envvar="VMFLOW_ALLOW_UNRELATED_HISTORY",
              help="Apply a branch that was force-pushed with history unrelated to the applied revision.")
@click.option("--token", envvar="VMFLOW_TOKEN",
              help="Bearer token for POST /sync, /suspend, /resume (without it those are refused).")
@click.option("--webhook-secret", envvar="VMFLOW_WEBHOOK_SECRET",
              help="Shared secret of the git webhook (GitHub HMAC, GitLab token). Without it the webhook is off.")
@click.option("--image-root", type=click.Path(file_okay=False, path_type=Path), envvar="VMFLOW_IMAGE_ROOT",
              help="Where image files are (default: images/ in the state directory).")
@click.option("--keep-snapshots", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--parallelism", type=click.IntRange(1, 64), default=None,
              help="VMs changed at a time (default: 4 on a real hypervisor, 1 on the embedded default).")
@click.option("--monitor-interval", type=click.FloatRange(0), default=None,
              envvar="VMFLOW_MONITOR_INTERVAL", metavar="SECONDS",
              help="Seconds between samples of every VM, after which the morph rules are evaluated; 0 turns "
                   "monitoring and morphs off. Default: 10 on a real hypervisor, off on the embedded default, "
                   "whose test driver has no real resource counters (`vmflow simulate` replays traces instead).")
@click.option("--stability", type=click.FloatRange(0), default=30.0, show_default=True, envvar="VMFLOW_STABILITY",
              metavar="SECONDS",
              help="Seconds a morphed VM must stay healthy after the change; a failed health check within them "
                   "rolls the morph back to its snapshot.")
@click.option("--max-morphs-per-hour", type=click.IntRange(1), default=6, show_default=True,
              envvar="VMFLOW_MAX_MORPHS_PER_HOUR", metavar="N",
              help="Fires and reverts of one VM in any hour; more are held back (skipped-rate).")
@click.option("--morph-concurrency", type=click.IntRange(1), default=4, show_default=True,
              envvar="VMFLOW_MORPH_CONCURRENCY", metavar="N", help="VMs of the program being morphed at once.")
@click.option("--notify-url", envvar="VMFLOW_NOTIFY_URL", metavar="URL",
              help="POST a small JSON document here for every failed or rolled-back morph and every failed "
                   "reconcile (5 s timeout; a failure is logged, never fatal).")
@click.option("--log-format", type=click.Choice(("text", "json")), default="text", show_default=True,
              envvar="VMFLOW_LOG_FORMAT")
@click.option("--log-level", type=click.Choice(("debug", "info", "warning", "error")), default="info",
              show_default=True, envvar="VMFLOW_LOG_LEVEL")
def controller_cmd(repo, branch, subpath, libvirt_uri, state_dir, listen, once, poll, resync, no_watch, self_heal,
                   prune, allow_mass_delete, verify_signatures, trusted_keys, allow_unrelated_history, token,
                   webhook_secret, image_root, keep_snapshots, parallelism, monitor_interval, stability,
                   max_morphs_per_hour, morph_concurrency, notify_url, log_format, log_level) -> None:
    """Watch a git repository and keep the VMs in step with its branch.

    Each new commit is compiled straight from git (no checkout), planned against libvirt and applied with
    a snapshot before every change. A commit that does not compile leaves the last good revision applied
    and the program Stalled; a failed apply is not retried in a loop. Drift is reported, and reverted
    with --self-heal. Status and history are in the state directory's database: `vmflow status`,
    `vmflow history`. `vmflow rollback REV` pins an older revision until the next commit.

    Between reconciles every VM is sampled each --monitor-interval seconds and the morph rules of the
    applied revision act on the samples: each morph is snapshotted, applied, verified and watched for
    --stability seconds, and rolled back if the VM turns unhealthy. Morphs are events in `vmflow status`.

    \b
    Examples:
      vmflow controller --repo . --once                       # one reconcile of ./ on the embedded default
      vmflow controller --repo /srv/infra --path apps/web --libvirt qemu:///system
      vmflow controller --repo https://git.example.com/infra.git --webhook-secret "$SECRET" \\
                        --listen 0.0.0.0:8787 --self-heal --prune
      vmflow controller --config /etc/vmflow/controller.yaml  # the same options as YAML keys

    SIGTERM finishes the change in flight, starts no other, and exits 0.
    """
    from controller.gitsource import GitError
    from controller.reconcile import Settings
    from controller.rules import Limits
    from controller.service import Config, Controller, setup_logging

    setup_logging(log_format, log_level)
    if verify_signatures and trusted_keys is None:
        raise click.UsageError("--verify-signatures needs --trusted-keys DIR")
    settings = Settings(self_heal=self_heal, prune=prune, allow_mass_delete=allow_mass_delete,
                        verify_signatures=verify_signatures, trusted_keys=trusted_keys,
                        allow_unrelated_history=allow_unrelated_history, keep_snapshots=keep_snapshots,
                        parallelism=parallelism, image_root=image_root)
    cfg = Config(repo=repo, branch=branch, path=subpath, libvirt=libvirt_uri, state_dir=state_dir,
                 listen=None if once or listen in ("", "off", "none") else listen, poll=poll, resync=resync,
                 token=token, webhook_secret=webhook_secret, watch=not no_watch, settings=settings,
                 monitor_interval=monitor_interval, stability=stability,
                 limits=Limits(max_morphs_per_vm_per_hour=max_morphs_per_hour, fleet_concurrency=morph_concurrency),
                 notify_url=notify_url or None)
    from controller.server import ListenError, check_listen, parse_listen

    if cfg.listen:
        try:
            host, port = parse_listen(cfg.listen)
        except ValueError as e:
            raise click.UsageError(f"--listen: {e}") from None
    # What a typo in the command line or the config file would otherwise leave behind (a state folder and a
    # status document for a program that is not there) is checked first, and nothing is written.
    try:
        _check_source(repo, branch, subpath, once)
        if cfg.listen:
            check_listen(host, port)
    except (GitError, ValueError, ListenError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_ERROR)
    with _state_errors(state_dir):
        _repair_status(cfg)
        try:
            ctrl = Controller(cfg)
        except json.JSONDecodeError:
            raise
        except (GitError, ValueError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_ERROR)
        except OSError as e:
            click.echo(f"error: cannot use the state folder `{state_dir}`: {e.strerror or e}", err=True)
            sys.exit(EXIT_ERROR)
        try:
            code = ctrl.run_once() if once else ctrl.run()
        except ListenError as e:  # taken between the check above and the server's start
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_ERROR)
        if once:
            doc = ctrl.store.get_status(ctrl.program) or {}
            _print_status(doc, False, sys.stdout.isatty())
            err = doc.get("last_error") if code else None
            if isinstance(err, dict):
                click.echo(f"error: {err.get('reason')}: {err.get('message')}", err=True)
    sys.exit(code)


def _repair_status(cfg) -> None:
    """A status document of this program that is damaged (not JSON, not an object) is written afresh, with
    a warning: it is the controller's own record, and the controller could not start over it."""
    import logging

    from controller.gitsource import GitSource
    from controller.reconcile import reset_damaged_status
    from controller.store import Store

    db = cfg.state_dir / "vmflow.db"
    if not db.is_file():
        return
    store = Store(db)
    try:
        source = GitSource(cfg.repo, cfg.branch, cfg.path, cache_dir=cfg.state_dir / "git")
        why = reset_damaged_status(store, source.program_name, source, cfg.libvirt, cfg.settings)
        if why is not None:
            logging.getLogger("vmflow.controller").warning(
                f"the status of `{source.program_name}` in {db} was damaged ({why}); it is written afresh")
    finally:
        store.close()


def _check_source(repo: str, branch: str, subpath: str, once: bool) -> None:
    """Raise what a local repository's first read would: it does not exist, is a file, is not a git
    repository; with --once also a branch it does not have (a service waits for the branch to be pushed).
    A remote is not reached here: its mirror lives in the state folder."""
    from controller.gitsource import GitSource

    with GitSource(repo, branch, subpath) as source:
        source.check()
        if once and source.local:
            head = source.head()
            if source.path and source.tree(head).kind(source.path) is None:
                raise ValueError(f"--path `{subpath}` does not exist in `{repo}` at the head of `{branch}` "
                                 f"({head[:12]})")


COMMANDS.append(controller_cmd)


# ------------------------------------------------------------------------------------------ status


def _open_store(state_dir: Path):
    from controller.store import Store

    db = state_dir / "vmflow.db"
    if not db.is_file():
        what = "is not a file" if db.exists() else "does not exist"
        click.echo(f"error: no vmflow state in `{state_dir}` (`{db.name}` {what}; no controller has run there); "
                   "pass --state-dir", err=True)
        sys.exit(EXIT_ERROR)
    with _state_errors(state_dir):
        return Store(db)


def _guarded(command):
    """A command over the state folder (its `state_dir` argument), with `_state_errors` around it."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        with _state_errors(kwargs.get("state_dir") or Path(".vmflow")):
            return command(*args, **kwargs)
    return run


@contextlib.contextmanager
def _state_errors(state_dir: Path):
    """A state database that cannot be read (not SQLite, damaged, locked, unwritable, the disk full) or a
    document in it that is not JSON: one `error:` line naming the file, and exit 1, instead of a crash."""
    db = state_dir / "vmflow.db"
    try:
        yield
    except json.JSONDecodeError as e:
        click.echo(f"error: the state database `{db}` is damaged: a document in it is not JSON ({e})", err=True)
        sys.exit(EXIT_ERROR)
    except Exception as e:
        if not _is_database_error(e):
            raise
        click.echo(f"error: the state database `{db}` cannot be used: {e}", err=True)
        sys.exit(EXIT_ERROR)


def _is_database_error(e: BaseException) -> bool:
    """sqlite3's DatabaseError (and its kinds), which the store lets through as they are. Told by name:
    only controller/store.py may import sqlite3."""
    return any(c.__module__ == "sqlite3" and c.__name__ == "DatabaseError" for c in type(e).__mro__)


def _ago(t: float | None) -> str:
    if not t:
        return "never"
    s = max(0, time.time() - t)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s / n:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def _print_status(doc: dict, verbose: bool, colour: bool) -> None:
    if not doc:
        click.echo("no status yet")
        return
    revs = doc.get("revisions", {})
    sync, health = doc.get("sync", "Unknown"), doc.get("health", "Missing")
    col = {"Synced": "green", "Healthy": "green", "OutOfSync": "yellow", "Progressing": "yellow",
           "Degraded": "red", "Missing": "red", "Unknown": "yellow"}

    def paint(s: str) -> str:
        return click.style(s, fg=col.get(s), bold=True) if colour else s

    src = doc.get("source", {})
    where = src.get("repo", "?") + (f" ({src.get('branch')}" + (f", {src['path']}" if src.get("path") else "") + ")")
    click.echo(f"program {doc.get('program')}   {paint(sync)}   {paint(health)}")
    click.echo(f"  source         {where}")
    click.echo(f"  hypervisor     {doc.get('uri') or '-'}")
    for label, key in (("observed", "observed"), ("last applied", "last_applied"),
                       ("last attempted", "last_attempted"), ("failed", "failed")):
        if revs.get(key) or key != "failed":
            click.echo(f"  {label:14} {(revs.get(key) or '-')[:12]}")
    if doc.get("pin"):
        pin = doc["pin"]
        click.echo(f"  pinned         {pin['revision'][:12]} by rollback {_ago(pin.get('at'))}; automatic apply "
                   f"resumes at the next commit after {pin['while_head'][:12]}")
    if doc.get("suspended"):
        click.echo(f"  suspended      {_ago(doc['suspended'].get('since'))}: {doc['suspended'].get('reason')}")
    click.echo(f"  self-heal      {'on' if doc.get('self_heal') else 'off'}   prune {'on' if doc.get('prune') else 'off'}")
    last = doc.get("last_reconcile") or {}
    if last:
        click.echo(f"  reconciled     {_ago(last.get('at'))} ({last.get('trigger')}): {last.get('result')} in "
                   f"{last.get('seconds') or 0:.2f}s")
    for c in doc.get("conditions", []):
        mark = "True " if c["status"] else "False"
        click.echo(f"  {c['type']:14} {mark} {c['reason']}" + (f": {c['message']}" if c.get("message") else ""))
    err = doc.get("last_error")
    if err:
        click.echo(f"  last error     {err.get('reason')}: {err.get('message')}")
        for d in (err.get("diagnostics") or [])[:20]:
            where = f"{d.get('file')}:{d.get('line')}:{d.get('column')}: " if d.get("file") else ""
            click.echo(f"    {where}{d.get('severity')}[{d.get('code')}]: {d.get('message')}")
    if doc.get("drift"):
        click.echo("  drift")
        for d in doc["drift"]:
            click.echo(f"    {d['address']} {d['path']}: applied {d['applied']}, now {d['actual']}")
    if doc.get("pending"):
        click.echo(f"  pending        {', '.join(doc['pending'][:20])}")
    inv = doc.get("inventory", [])
    click.echo(f"  inventory      {len(inv)} VM(s)")
    for v in inv[: (None if verbose else 20)]:
        morphs = f"  morphs: {', '.join(v['morphs'])}" if v.get("morphs") else ""
        click.echo(f"    {v['name']:20} {v['health']:9} {v['vcpus']} vCPU  {v['memory_kib'] // 1024} MiB  "
                   f"{v['image']}  @{(v.get('revision') or '-')[:12]}{morphs}")
    if len(inv) > 20 and not verbose:
        click.echo(f"    … and {len(inv) - 20} more (--verbose)")


@click.command("status")
@_state_dir_option
@click.option("--program", help="Only this program.")
@click.option("-f", "--format", "fmt", type=click.Choice(("text", "json")), default="text", show_default=True,
              help="json: the status documents, specs/controller.md.")
@click.option("-v", "--verbose", is_flag=True, help="Every VM of the inventory.")
@_no_color_option
@_guarded
def status_cmd(state_dir: Path, program: str | None, fmt: str, verbose: bool, no_color: bool) -> None:
    """Show each program's sync, health, revisions, conditions, last error and VMs.

    \b
    Sync:   Synced (the VMs match the applied revision) · OutOfSync (drift, pending deletes, a failed
            revision) · Unknown (nothing applied yet)
    Health: Healthy · Progressing (an apply is running) · Degraded (a VM failed or is stopped) · Missing
    \b
    Examples:
      vmflow status
      vmflow status --format json | jq '.programs.web.revisions'
    """
    from controller.reconcile import damaged_status

    store = _open_store(state_dir)
    docs = store.all_status()
    if program:
        docs = {k: v for k, v in docs.items() if k == program}
        if not docs:
            click.echo(f"error: no program `{program}` in {state_dir}", err=True)
            sys.exit(EXIT_ERROR)
    damaged = {k: why for k, v in docs.items() if (why := damaged_status(v)) is not None}
    docs = {k: v for k, v in docs.items() if k not in damaged}
    if fmt == "json":
        events = {p: [e.__dict__ for e in store.events(program=p, limit=20)] for p in docs}
        click.echo(json.dumps({"format_version": 1, "programs": docs, "events": events}, indent=2, default=str))
    else:
        for i, doc in enumerate(docs.values()):
            if i:
                click.echo()
            _print_status(doc, verbose, _colour(no_color))
            recent = store.events(program=doc.get("program"), limit=5)
            if recent:
                click.echo("  recent events")
                for e in recent:
                    click.echo(f"    {time.strftime('%m-%d %H:%M:%S', time.localtime(e.at))}  {e.kind}/{e.outcome}"
                               f"{' ' + e.vm if e.vm else ''}: {e.message}")
        if not docs and not damaged:
            click.echo("no programs yet")
    for name, why in damaged.items():
        click.echo(f"error: the status of `{name}` in `{state_dir / 'vmflow.db'}` is damaged ({why}); the next "
                   "`vmflow controller` run writes it afresh", err=True)
    sys.exit(EXIT_ERROR if damaged else EXIT_OK)


COMMANDS.append(status_cmd)


@click.command("history")
@_state_dir_option
@click.option("--program", help="Only this program.")
@click.option("-n", "--limit", type=click.IntRange(1, 10000), default=20, show_default=True)
@click.option("-f", "--format", "fmt", type=click.Choice(("text", "json")), default="text", show_default=True)
@_guarded
def history_cmd(state_dir: Path, program: str | None, limit: int, fmt: str) -> None:
    """Every apply, newest first: revision, when, how long, the result and the changes.

    \b
    Example:
      vmflow history -n 5
    """
    store = _open_store(state_dir)
    rows = store.history(program, limit)
    if fmt == "json":
        click.echo(json.dumps({"format_version": 1, "applies": [r.__dict__ for r in rows]}, indent=2, default=str))
        return
    if not rows:
        click.echo("no applies yet")
        return
    click.echo(f"{'STARTED':19}  {'PROGRAM':12} {'REVISION':12} {'TOOK':>7}  {'RESULT':11} CHANGES")
    for r in rows:
        took = f"{r.finished - r.started:.1f}s" if r.finished else "-"
        changes = r.summary.get("changes", []) if isinstance(r.summary, dict) else []
        what = ", ".join(f"{c['action']} {c['address']}" + ("" if c["result"] == "applied" else f" ({c['result']})")
                         for c in changes[:4]) + (f", … {len(changes) - 4} more" if len(changes) > 4 else "")
        click.echo(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r.started))}  {r.program:12} "
                   f"{(r.revision or '-')[:12]:12} {took:>7}  {r.result or 'running':11} {what or '-'}")


COMMANDS.append(history_cmd)


# ------------------------------------------------------------------------------------------ rollback, sync


def _reconciler_from_status(store, state_dir: Path, program: str | None):
    """A Reconciler configured as the controller that wrote the status (source, hypervisor, switches)."""
    from controller.gitsource import GitError, GitSource
    from controller.reconcile import Reconciler, Settings

    docs = store.all_status()
    if program is None:
        if len(docs) != 1:
            click.echo(f"error: {len(docs)} programs in {state_dir}; name one with --program", err=True)
            sys.exit(EXIT_ERROR)
        program = next(iter(docs))
    doc = docs.get(program)
    if doc is None:
        click.echo(f"error: no program `{program}` in {state_dir}", err=True)
        sys.exit(EXIT_ERROR)
    src = doc.get("source") if isinstance(doc, dict) else None
    if not (isinstance(src, dict) and all(isinstance(src.get(k), str) for k in ("repo", "branch", "path"))):
        click.echo(f"error: the status of `{program}` in `{state_dir / 'vmflow.db'}` is damaged: it does not say "
                   "which repository, branch and path the program comes from; run `vmflow controller` again to "
                   "rewrite it", err=True)
        sys.exit(EXIT_ERROR)
    try:
        source = GitSource(src["repo"], src["branch"], src["path"], cache_dir=state_dir.resolve() / "git")
    except (GitError, ValueError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_ERROR)
    uri = doc.get("uri")
    from controller import embedded

    settings = Settings(self_heal=doc.get("self_heal", False), prune=doc.get("prune", False))
    return Reconciler(source, store, state_dir.resolve(),
                      libvirt_uri=None if not uri or embedded.is_embedded(uri) else uri, settings=settings,
                      progress=lambda m: click.echo(m, err=True)), doc


def _reconcile_here(rec, trigger: str, retry_failed: bool = False, lock_timeout: float = 60.0) -> int:
    code, _out, error = _reconcile_outcome(rec, trigger, retry_failed, lock_timeout)
    if error:
        click.echo(f"error: {error}", err=True)
    return code


def _reconcile_outcome(rec, trigger: str, retry_failed: bool, lock_timeout: float):
    """(exit code, Outcome, error message or "") of one reconcile in this process, waiting up to
    `lock_timeout` seconds for the apply lock. The Outcome is None when a temporary error (the lock still
    held, git or libvirt unreachable) stopped it before anything was applied. A success is printed here;
    an error is the caller's to print, as one line."""
    from controller.reconcile import TemporaryError
    from controller.store import LockHeld

    deadline = time.monotonic() + lock_timeout
    # Wait for a running apply here, quietly: each refused reconcile would write the status and an event.
    try:
        rec.store.acquire(rec.program, "vmflow", f"waiting to reconcile ({trigger})", lock_timeout)
        rec.store.release(rec.program)
    except LockHeld as e:
        return EXIT_ERROR, None, str(e)
    while True:
        try:
            out = rec.reconcile_once(trigger=trigger, retry_failed=retry_failed)
            break
        except TemporaryError as e:
            if e.reason == "LockHeld" and time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            return EXIT_ERROR, None, str(e)
    line = f"{out.result}: {out.message or 'revision ' + (out.revision or '-')[:12]}"
    if out.result in ("synced", "noop"):
        click.echo(line)
        return EXIT_OK, out, ""
    return EXIT_ERROR, out, line


@click.command("rollback")
@click.argument("rev")
@_state_dir_option
@click.option("--program", help="The program to roll back (needed when the state holds several).")
@click.option("--lock-timeout", type=click.FloatRange(0), default=60.0, show_default=True,
              help="Seconds to wait for a running apply of the controller to finish.")
@_guarded
def rollback_cmd(rev: str, state_dir: Path, program: str | None, lock_timeout: float) -> None:
    """Apply an older revision's program now, and hold it until the next commit.

    REV is any git revision (sha, tag, `main~2`). The rollback pins the program to REV: a running
    controller keeps applying REV (and self-heals towards it) instead of the branch head, until a new
    commit arrives on the branch; that commit lifts the pin and is applied as usual. So a rollback is
    never silently undone by automatic apply, and fixing forward needs no extra command.
    `vmflow rollback -` lifts the pin at once.

    \b
    Examples:
      vmflow history                    # find the revision that worked
      vmflow rollback 3f2c1a9
    """
    from controller.gitsource import GitError
    from controller.reconcile import control_key
    from controller.service import set_pin

    store = _open_store(state_dir)
    rec, doc = _reconciler_from_status(store, state_dir, program)
    try:
        if rev == "-":
            set_pin(store, rec.program, None)
            click.echo(f"{rec.program}: the pin is lifted; the branch head is applied again")
            sys.exit(_reconcile_here(rec, "rollback cleared", lock_timeout=lock_timeout))
        try:
            rec.source.fetch()
            head = rec.source.head()
            sha = rec.source.resolve(rev)
            _rollback_preflight(rec, doc, rev, sha)
        except GitError as e:
            click.echo(f"error: {e}; nothing was changed", err=True)
            sys.exit(EXIT_ERROR)
        before = store.get_doc(control_key(rec.program), {}).get("pin")
        set_pin(store, rec.program, {"revision": sha, "while_head": head, "at": time.time(), "requested": rev})
        store.add_event(rec.program, None, "rollback", "pinned",
                        f"rolled back to {sha[:12]} ({rev}); automatic apply waits for a commit after {head[:12]}")
        click.echo(f"{rec.program}: rolling back to {sha[:12]}; held there until a commit after {head[:12]}")
        code, out, error = _reconcile_outcome(rec, f"rollback to {sha[:12]}", True, lock_timeout)
        applied = (rec.status().get("revisions") or {}).get("last_applied")
        if code != EXIT_OK and (out is None or out.result == "stalled") and applied != sha:
            # Nothing of REV was applied (the lock stayed held, libvirt was unreachable, the plan was refused):
            # the pin goes back to what it was, so that a running controller does not apply REV later, behind
            # the back of an operator who was told the rollback failed.
            set_pin(store, rec.program, before)
            status = rec.status()
            status["pin"] = before
            store.put_status(rec.program, status)
            store.add_event(rec.program, None, "rollback", "failed",
                            f"the rollback to {sha[:12]} ({rev}) was not applied; the pin is back as it was")
            error += f"; the rollback to {sha[:12]} was not applied, and the program is not pinned to it"
        if error:
            click.echo(f"error: {error}", err=True)
        sys.exit(code)
    finally:
        rec.close()
        store.close()


def _rollback_preflight(rec, doc: dict, rev: str, sha: str) -> None:
    """Refuse, before anything is pinned, a revision the reconcile would refuse anyway: one on history
    unrelated to the applied revision, or one whose program does not compile (its diagnostics first)."""
    from compiler import render
    from compiler.diagnostics import has_errors

    last = (doc.get("revisions") or {}).get("last_applied")
    if isinstance(last, str) and last != sha and not rec.source.related(last, sha):
        click.echo(f"error: revision {sha[:12]} ({rev}) shares no history with the applied revision {last[:12]}: "
                   "it is not a revision of this branch; nothing was changed", err=True)
        sys.exit(EXIT_ERROR)
    comp = rec.source.compile(rec.compiler, sha)
    if not comp.ok or has_errors(comp.diagnostics):
        click.echo(render.render("plain", comp.diagnostics, comp.sources, False), nl=False, err=True)
        click.echo(f"error: the program does not compile at {sha[:12]} ({rev}): "
                   f"{render.summary(comp.diagnostics)}; nothing was changed", err=True)
        sys.exit(EXIT_ERROR)


COMMANDS.append(rollback_cmd)


@click.command("sync")
@_state_dir_option
@click.option("--program", help="The program to reconcile (needed when the state holds several).")
@click.option("--lock-timeout", type=click.FloatRange(0), default=60.0, show_default=True,
              help="Seconds to wait for a running apply of the controller to finish.")
@_guarded
def sync_cmd(state_dir: Path, program: str | None, lock_timeout: float) -> None:
    """Reconcile now, retrying a revision that failed once.

    A controller does not retry a failed revision in a loop; after fixing what made it fail (a full
    disk, a host that was down), `vmflow sync` tries it once more.
    """
    store = _open_store(state_dir)
    rec, _doc = _reconciler_from_status(store, state_dir, program)
    try:
        sys.exit(_reconcile_here(rec, "sync", retry_failed=True, lock_timeout=lock_timeout))
    finally:
        rec.close()
        store.close()


COMMANDS.append(sync_cmd)


def _suspend(state_dir: Path, program: str | None, suspended: bool, reason: str) -> None:
    from controller.service import set_suspended

    store = _open_store(state_dir)
    docs = store.all_status()
    names = [program] if program else list(docs)
    if program and program not in docs:
        click.echo(f"error: no program `{program}` in {state_dir}", err=True)
        sys.exit(EXIT_ERROR)
    for name in names:
        set_suspended(store, name, suspended, reason)
        store.add_event(name, None, "control", "suspended" if suspended else "resumed", reason)
        click.echo(f"{name}: {'suspended: nothing is applied until `vmflow resume`' if suspended else 'resumed'}")
    store.close()


@click.command("suspend")
@_state_dir_option
@click.option("--program", help="Only this program (default: every program in the state).")
@click.option("--reason", default="suspended by an operator", show_default=True)
@_guarded
def suspend_cmd(state_dir: Path, program: str | None, reason: str) -> None:
    """Stop applying: the controller keeps observing and reporting, and changes nothing."""
    _suspend(state_dir, program, True, reason)


@click.command("resume")
@_state_dir_option
@click.option("--program", help="Only this program (default: every program in the state).")
@_guarded
def resume_cmd(state_dir: Path, program: str | None) -> None:
    """Apply again after `vmflow suspend`; the next reconcile catches up with the branch."""
    _suspend(state_dir, program, False, "resumed by an operator")


COMMANDS.extend([suspend_cmd, resume_cmd])
