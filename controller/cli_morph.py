"""The run-time commands: `simulate` and `events`.

They are registered on the `vmflow` group by controller/cli.py, which owns exit codes and shared options.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

# Defined before the imports below: `python -m controller.cli` imports this module while controller.cli is
# still loading, and that module reads COMMANDS when it is done.
COMMANDS: list = []

from compiler import render  # noqa: E402
from controller.cli import EXIT_ERROR, EXIT_OK, _colour, _images_option, _no_color_option  # noqa: E402
from controller.cli_ops import _guarded, _open_store, _state_dir_option  # noqa: E402

# ------------------------------------------------------------------------------------------ simulate


@click.command("simulate")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--metrics", "trace", required=True, metavar="TRACE", type=click.Path(path_type=Path),
              help="The recorded load: a CSV file (plain or gzip) shaped like the Bitbrains traces, with an "
                   "optional trace_id column, or a folder of such files (specs/monitoring.md).")
@click.option("--map", "maps", multiple=True, metavar="VM=TRACE_ID",
              help="Replay trace TRACE_ID (a trace_id in the file, or a file in the folder) as the load of "
                   "VM (repeatable). VMs without one get no samples, and their rules never act.")
@click.option("--start", metavar="WHEN",
              help="Start here instead of at the trace's start: a duration from it (`2h`, `3d`) or a UTC date "
                   "and time (`2013-08-05T14:00`). Earlier samples are history the rules may look back at.")
@click.option("--end", metavar="WHEN", help="Stop here instead of at the trace's end (as --start).")
@click.option("--interval", metavar="DURATION",
              help="Simulated time between rule rounds (default: the trace's step, 5m).")
@click.option("-f", "--format", "fmt", type=click.Choice(("text", "json")), default="text", show_default=True,
              help="text: a timeline and a summary; json: specs/simulate.md.")
@_images_option
@_no_color_option
def simulate_cmd(paths: tuple[Path, ...], trace: Path, maps: tuple[str, ...], start: str | None, end: str | None,
                 interval: str | None, fmt: str, images: tuple[Path, ...], no_color: bool) -> None:
    """Replay recorded load against a program's morph rules, in simulated time.

    The program's VMs are created on a private test hypervisor (your .vmflow state is not touched), and
    the controller's rule engine, planner and apply run over the trace with a simulated clock: one round
    per 5-minute sample by default, so a month of load takes seconds. Prints when each morph fired,
    reverted or was held back and why, with the VM's size after it; then, per VM, the morphs applied,
    reverted and skipped, how long each rule's condition held, and the peak vCPUs and memory of each VM
    and pool against their bounds and capacity.

    PATHS are program folders or files (default: the current folder), as for `vmflow validate`.

    \b
    Examples:
      vmflow simulate examples/simulate --metrics tests/data/trace-small.csv --map web=web --map db=db
      vmflow simulate infra/web --metrics traces/ --map web=41 --end 3d
      vmflow simulate infra/web --metrics month.csv.gz --map web=month --format json | jq '.simulations[0].vms'

    Exit codes: 0 simulated, 1 bad input (a program that does not validate, a missing trace, an unknown VM
    or trace id, a trace row that is not a time and amounts, a span of more than 200,000 rounds), 64 bad
    command line.
    """
    from compiler.program import Compiler, discover
    from controller import simulate as sim

    try:
        mapping = sim.parse_map(maps)
        bounds = [sim.parse_time(x) if x is not None else None for x in (start, end)]
        step = sim.parse_time(interval) if interval is not None else None
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if step is not None and not (isinstance(step, float) and step > 0):
        raise click.UsageError(f"--interval wants a positive duration (`5m`, `1h`), not `{interval}`")
    if not mapping:
        raise click.UsageError("no --map given: name the trace each VM replays, e.g. --map web=web")
    for p in paths or (Path("."),):
        if not p.exists():
            _fail(f"the program `{p}` does not exist")
    programs, diags = discover(list(paths) or [Path(".")])
    if not programs:
        _fail(diags[0].message if diags else "no program to simulate")
    compiler = Compiler(images=list(images))
    compiled = [(p, compiler.compile_path(p)) for p in programs]
    bad = [c for _p, c in compiled if not c.ok]
    if bad:
        for c in bad:
            click.echo(render.render("human", c.diagnostics, c.sources, _colour(no_color)), nl=False, err=True)
        click.echo("error: the program does not validate "
                   f"({'; '.join(render.summary(c.diagnostics) for c in bad)}); nothing was simulated", err=True)
        sys.exit(EXIT_ERROR)
    vms = {name for _p, c in compiled for name in c.program.vms}
    unknown = sorted(set(mapping) - vms)
    if unknown:
        names = sorted(vms)
        where = programs[0] if len(programs) == 1 else "the programs"
        _fail(f"--map names `{unknown[0]}`, which is not a VM of `{where}` (VMs: {', '.join(names[:12])}"
              f"{', …' if len(names) > 12 else ''})")
    results = []
    for p, c in compiled:
        mine = {vm: ref for vm, ref in mapping.items() if vm in c.program.vms}
        if not mine:
            click.echo(f"note: no VM of `{p}` has a trace; it was not simulated", err=True)
            continue
        try:
            results.append(sim.simulate(p, trace, mine, start=bounds[0], end=bounds[1], interval=step,
                                        compiler=compiler))
        except sim.SimulateError as e:
            _fail(str(e))
    if fmt == "json":
        click.echo(json.dumps(sim.to_json(results), indent=2))
    else:
        click.echo(sim.render_text(results, _colour(no_color)), nl=False)
    sys.exit(EXIT_OK)


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_ERROR)


COMMANDS.append(simulate_cmd)


# ------------------------------------------------------------------------------------------ events


@click.command("events")
@_state_dir_option
@click.option("--program", help="Only this program's events.")
@click.option("--vm", help="Only this VM's events.")
@click.option("--kind", metavar="KIND", help="Only events of this kind: morph, reconcile, rollback, control, ...")
@click.option("--since", metavar="WHEN",
              help="Only events at or after this: a duration ago (`1h`, `2d`) or a UTC date and time.")
@click.option("-n", "--limit", type=click.IntRange(1, 100000), default=50, show_default=True)
@click.option("-f", "--format", "fmt", type=click.Choice(("text", "json")), default="text", show_default=True,
              help="text: one line per event; json: the events with their data.")
@_guarded
def events_cmd(state_dir: Path, program: str | None, vm: str | None, kind: str | None, since: str | None,
               limit: int, fmt: str) -> None:
    """The event log, newest first: morphs fired, applied, reverted, rolled back or held back; reconciles;
    rollbacks; suspends and resumes.

    Text is one line per event: the time (local), the program, the VM (`-` for none), the kind and
    outcome, and the message.

    \b
    Examples:
      vmflow events --since 1h
      vmflow events --vm web --kind morph -n 20
      vmflow events --format json | jq '.events[] | select(.outcome == "rolled-back")'
    """
    from controller.simulate import parse_time

    after = None
    if since is not None:
        try:
            when = parse_time(since)
        except ValueError as e:
            raise click.UsageError(f"--since: {e}") from None
        after = when.timestamp() if not isinstance(when, float) else time.time() - when
    store = _open_store(state_dir)
    try:
        found = store.events(program=program, vm=vm, since=after, kind=kind, limit=limit)
    finally:
        store.close()
    if fmt == "json":
        click.echo(json.dumps({"format_version": 1, "events": [_event_json(e) for e in found]}, indent=2,
                              default=str))
        return
    if not found:
        click.echo("no events")
        return
    wp = max(len(e.program) for e in found)
    wv = max(len(e.vm or "-") for e in found)
    wk = max(len(f"{e.kind}/{e.outcome}") for e in found)
    for e in found:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.at))
        click.echo(f"{stamp}  {e.program:{wp}}  {e.vm or '-':{wv}}  {e.kind + '/' + e.outcome:{wk}}  {e.message}")


def _event_json(e) -> dict:
    return {"id": e.id, "at": e.at, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.at)),
            "program": e.program, "vm": e.vm, "kind": e.kind, "outcome": e.outcome, "message": e.message,
            "data": e.data}


COMMANDS.append(events_cmd)
