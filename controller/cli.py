"""The `vmflow` command line: thin commands, one library call each.

This is the only place diagnostics become exit codes and messages:
  0  success (valid program, nothing to change)
  1  the input has errors (diagnostics were printed), or a command failed
  64 the command line itself is wrong (unknown option, missing argument)
  70 an internal error in vmflow (a bug: please report it with the input)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from compiler import render
from compiler.diagnostics import has_errors, sort
from compiler.source import SourceSet

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 64, 70
FORMATS = ("human", "plain", "json", "github")


def _colour(no_color: bool) -> bool:
    return not no_color and "NO_COLOR" not in os.environ and sys.stdout.isatty()


def _images_option(f):
    return click.option("--images", "images", multiple=True, type=click.Path(file_okay=False, path_type=Path),
                        help="Another folder of image schemas (repeatable). Searched after the program's own "
                             "images/ folder and before VMFLOW_IMAGES and the built-in catalog.")(f)


def _no_color_option(f):
    return click.option("--no-color", is_flag=True, help="No ANSI colour (also when NO_COLOR is set).")(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="vmflow")
def cli() -> None:
    """GitOps for virtual machines.

    Teams commit `.flow` files to git; vmflow compiles them into a validated graph of pools, VMs, morph
    rules, chains and reservations. Each directory holding `.flow` files is one program.

    \b
    Start here:
      vmflow validate examples/          check every program under a folder
      vmflow fmt --check .               is every file canonically formatted?
      vmflow graph examples/web -f mermaid
      vmflow explain F201                what a diagnostic code means

    Exit codes: 0 ok, 1 errors found, 64 bad command line, 70 internal error.
    """


# ------------------------------------------------------------------------------------------ validate


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("-f", "--format", "fmt", type=click.Choice(FORMATS), default="human", show_default=True,
              help="human: framed with carets; plain: one line each; json: specs/formats.md; "
                   "github: workflow annotations.")
@click.option("--strict", is_flag=True, help="Warnings fail the check too.")
@_images_option
@_no_color_option
def validate(paths: tuple[Path, ...], fmt: str, strict: bool, images: tuple[Path, ...], no_color: bool) -> None:
    """Check programs: syntax, names, units, image schemas, bounds, capacity, chains.

    PATHS are folders or files (default: the current folder). Every folder under a PATH that holds
    `.flow` files is checked as one program. All problems are reported at once, sorted by file and line.

    \b
    Examples:
      vmflow validate
      vmflow validate examples/ --strict
      vmflow validate infra/ --format github     # annotations on the PR diff
    """
    from compiler.program import Compiler, discover

    programs, diags = discover(list(paths) or [Path(".")])
    compiler = Compiler(images=list(images))
    sources = SourceSet()
    report = []
    for p in programs:
        comp = compiler.compile_path(p)
        sources.update(comp.sources)
        diags.extend(comp.diagnostics)
        report.append((p, comp))
    diags = sort(diags)
    failed = has_errors(diags) or (strict and bool(diags))
    out = render.render(fmt, diags, sources, _colour(no_color), strict=strict)
    click.echo(out, nl=False)
    if fmt == "human":
        for p, comp in report:
            mark = click.style("✗", fg="red") if not comp.ok else click.style("✓", fg="green")
            if not _colour(no_color):
                mark = "FAIL" if not comp.ok else "ok  "
            click.echo(f"{mark} {_rel(p)}: {len(comp.files)} file{'s' if len(comp.files) != 1 else ''}, "
                       f"{comp.lines:,} lines, {render.summary(comp.diagnostics)}")
    elif fmt == "plain":
        click.echo(f"{len(programs)} program{'s' if len(programs) != 1 else ''}: {render.summary(diags)}")
    sys.exit(EXIT_ERROR if failed else EXIT_OK)


def _rel(p: Path) -> str:
    try:
        return os.path.relpath(p)
    except ValueError:  # pragma: no cover
        return str(p)


# ------------------------------------------------------------------------------------------ fmt


@cli.command("fmt")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--check", is_flag=True, help="Change nothing; exit 1 when any file would change.")
@click.option("--diff", "show_diff", is_flag=True, help="Print what would change as a unified diff.")
@_no_color_option
def fmt_cmd(paths: tuple[Path, ...], check: bool, show_diff: bool, no_color: bool) -> None:
    """Rewrite `.flow` files in the canonical style, keeping every comment.

    One fact a line, two-space indents, aligned `=` in runs of attributes. Formatting is idempotent:
    formatting formatted text changes nothing. Files that do not parse are left untouched and reported.

    \b
    Examples:
      vmflow fmt                  # format every .flow file under the current folder
      vmflow fmt --check --diff   # in CI or pre-commit: fail and show what would change
    """
    import difflib

    from compiler.fmt import format_source
    from compiler.parser import decode
    from compiler.program import _walk

    files: list[Path] = []
    for p in paths or (Path("."),):
        if p.is_dir():
            files.extend(_walk(p))
        elif p.exists():
            files.append(p)
        else:
            raise click.UsageError(f"`{p}` does not exist")
    changed, diags, sources = [], [], SourceSet()
    for f in files:
        name = _rel(f)
        data = f.read_bytes()
        text, d = decode(name, data)
        if text is None:
            diags.extend(d)
            sources.add(name, data.decode("utf-8", errors="replace"))
            continue
        sources.add(name, text)
        new, d = format_source(name, text)
        if new is None:
            diags.extend(d)
            continue
        if new != text:
            changed.append(name)
            if show_diff:
                click.echo("".join(difflib.unified_diff(text.splitlines(True), new.splitlines(True),
                                                        f"a/{name}", f"b/{name}")), nl=False)
            if not check:
                f.write_text(new, encoding="utf-8")
    if diags:
        click.echo(render.render("human", sort(diags), sources, _colour(no_color)), nl=False, err=True)
    verb = "would reformat" if check else "reformatted"
    for name in changed:
        click.echo(f"{verb} {name}", err=True)
    click.echo(f"{len(files)} file{'s' if len(files) != 1 else ''}: {len(changed)} {verb}"
               f"{f', {len(diags)} not parsed' if diags else ''}", err=True)
    sys.exit(EXIT_ERROR if diags or (check and changed) else EXIT_OK)


# ------------------------------------------------------------------------------------------ graph


@cli.command()
@click.argument("path", required=False, type=click.Path(path_type=Path), default=Path("."))
@click.option("-f", "--format", "fmt", type=click.Choice(("dot", "mermaid", "json")), default="dot",
              show_default=True)
@_images_option
@_no_color_option
def graph(path: Path, fmt: str, images: tuple[Path, ...], no_color: bool) -> None:
    """Print a program's dependency and data-flow graph.

    Nodes are addresses (`pool.rack1`, `vm.web`, `morph.web.grow`, `chain.c.step.s`); an edge runs from
    what must exist or run first to what depends on it. Data edges are labelled with the data they carry.

    \b
    Examples:
      vmflow graph examples/web | dot -Tsvg > web.svg
      vmflow graph examples/image_processing -f json
    """
    from compiler.program import Compiler

    if not path.exists():
        raise click.UsageError(f"`{path}` does not exist")
    comp = Compiler(images=list(images)).compile_path(path)
    if not comp.ok:
        click.echo(render.render("human", comp.diagnostics, comp.sources, _colour(no_color)), nl=False, err=True)
        click.echo(f"error: the program does not validate: {render.summary(comp.diagnostics)}", err=True)
        sys.exit(EXIT_ERROR)
    if fmt == "json":
        click.echo(json.dumps(comp.graph.to_json(), indent=2))
    elif fmt == "mermaid":
        click.echo(comp.graph.to_mermaid(), nl=False)
    else:
        click.echo(comp.graph.to_dot(), nl=False)


# ------------------------------------------------------------------------------------------ explain


@cli.command()
@click.argument("code")
def explain(code: str) -> None:
    """Explain a diagnostic code: what it means, an example, and how to fix it.

    \b
    Example:
      vmflow explain F303
    """
    from controller.docs import explain_code, known_codes

    text = explain_code(code)
    if text is None:
        from compiler.diagnostics import did_you_mean

        hint = did_you_mean(code.upper(), known_codes())
        click.echo(f"error: no diagnostic code `{code}`" + (f"; {hint}" if hint else ""), err=True)
        click.echo("the codes are listed in specs/diagnostics.md", err=True)
        sys.exit(EXIT_ERROR)
    click.echo(text)


# ------------------------------------------------------------------------------------------ import


@cli.group("import")
def import_group() -> None:
    """Bring definitions from other formats into `.flow`."""


@import_group.command("workflow")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the .flow text here instead of standard output. An existing file is not overwritten "
                   "unless --force is given.")
@click.option("--force", is_flag=True, help="Overwrite the output file if it exists.")
@_no_color_option
def import_workflow_cmd(file: Path, output: Path | None, force: bool, no_color: bool) -> None:
    """Import a JSON workflow definition as a `.flow` chain.

    Steps become `step` blocks (names in snake_case), `input_data`/`output_data` become `in`/`out`, and
    `next_step` becomes edges. A `next_step` such as `image_resize` resolves to the step named
    `ImageResize`; what cannot be resolved is reported with its place in the JSON.

    \b
    Example:
      vmflow import workflow pipeline.json -o pipeline.flow
    """
    from compiler.workflow import import_workflow

    name = _rel(file)
    data = file.read_bytes()
    text, diags = import_workflow(name, data)
    sources = SourceSet()
    sources.add(name, data.decode("utf-8", errors="replace"))
    if diags:
        click.echo(render.render("human", sort(diags), sources, _colour(no_color)), nl=False, err=True)
    if text is None or has_errors(diags):
        sys.exit(EXIT_ERROR)
    if output is None:
        click.echo(text, nl=False)
    else:
        if output.exists() and not force:
            click.echo(f"error: `{output}` exists; pass --force to overwrite it", err=True)
            sys.exit(EXIT_ERROR)
        if not output.parent.is_dir():
            click.echo(f"error: the folder `{output.parent}` does not exist", err=True)
            sys.exit(EXIT_ERROR)
        output.write_text(text, encoding="utf-8")
        click.echo(f"wrote {output}", err=True)


# ------------------------------------------------------------------------------------------ images


@cli.command()
@click.option("--role", help="Only images with this workflow role (ingestion, transformation, inference, ...).")
@click.option("-f", "--format", "fmt", type=click.Choice(("table", "json")), default="table", show_default=True)
@click.option("--dir", "program_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="The program folder whose images/ folder is searched first.")
@_images_option
@_no_color_option
def images(role: str | None, fmt: str, program_dir: Path, images: tuple[Path, ...], no_color: bool) -> None:
    """List the image schemas a program can use.

    \b
    Examples:
      vmflow images
      vmflow images --role inference
    """
    from compiler.program import Compiler

    catalog, diags, sources = Compiler(images=list(images)).catalog(program_dir.resolve())
    if diags:
        click.echo(render.render("human", sort(diags), sources, _colour(no_color)), nl=False, err=True)
    found = catalog.with_role(role) if role else [catalog.get(i) for i in catalog.ids()]
    if fmt == "json":
        click.echo(json.dumps([_image_json(i) for i in found], indent=2))
    else:
        _image_table(found, _colour(no_color))
    if role and not found:
        click.echo(f"no image has the role `{role}`", err=True)
    sys.exit(EXIT_ERROR if has_errors(diags) else EXIT_OK)


def _image_json(i) -> dict:
    from compiler.units import format_bytes

    return {"id": i.id, "description": i.description, "os": i.os, "roles": list(i.roles),
            "capabilities": sorted(i.capabilities), "cpu": [i.cpu_min, i.cpu_max],
            "memory": [format_bytes(i.memory_min), format_bytes(i.memory_max)],
            "inputs": [{"name": p.name, "type": p.type, "format": p.format} for p in i.inputs],
            "outputs": [{"name": p.name, "type": p.type, "format": p.format} for p in i.outputs],
            "file": i.path}


def _image_table(found, colour: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    from compiler.units import format_bytes

    table = Table(box=None, pad_edge=False, header_style="bold" if colour else "")
    for col in ("IMAGE", "ROLES", "CPU", "MEMORY", "CAPABILITIES", "IN", "OUT"):
        table.add_column(col, overflow="fold")
    for i in found:
        table.add_row(i.id, ",".join(i.roles) or "-", f"{i.cpu_min}..{i.cpu_max}",
                      f"{format_bytes(i.memory_min)}..{format_bytes(i.memory_max)}",
                      ",".join(sorted(i.capabilities)) or "-",
                      ",".join(p.name for p in i.inputs) or "-", ",".join(p.name for p in i.outputs) or "-")
    Console(no_color=not colour, highlight=False, width=200 if not sys.stdout.isatty() else None).print(table)


# ------------------------------------------------------------------------------------------ plan / apply

EXIT_CHANGES = 2


def _target_options(f):
    f = click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
                     help="Where the embedded hypervisor, the journal and the lock live (default: .vmflow/ "
                          "beside the program).")(f)
    f = click.option("--libvirt", "libvirt_uri", metavar="URI", envvar="VMFLOW_LIBVIRT",
                     help="The libvirt URI to manage (qemu:///system, qemu+ssh://host/system). Default: the "
                          "host the program's pools name, else the embedded test driver.")(f)
    f = click.option("--image-root", type=click.Path(file_okay=False, path_type=Path), envvar="VMFLOW_IMAGE_ROOT",
                     help="Where image files (qcow2 bases, kernels) are; image paths are relative to it "
                          "(default: images/ in the state directory).")(f)
    f = click.option("--prune", is_flag=True, help="Delete VMs this program owns but no longer declares.")(f)
    f = click.option("--allow-mass-delete", is_flag=True,
                     help="Allow a prune that deletes more than half of the program's VMs.")(f)
    return f


def _load_target(path: Path, libvirt_uri, state_dir, no_color: bool, image_root=None):
    from controller.context import ContextError, load

    if not path.exists():
        raise click.UsageError(f"`{path}` does not exist")
    try:
        t = load(path, libvirt_uri, state_dir, image_root=image_root)
    except ContextError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_ERROR)
    if not t.compilation.ok:
        comp = t.compilation
        click.echo(render.render("human", comp.diagnostics, comp.sources, _colour(no_color)), nl=False, err=True)
        click.echo(f"error: the program does not validate ({render.summary(comp.diagnostics)}); nothing was planned",
                   err=True)
        sys.exit(EXIT_ERROR)
    return t


def _open_hypervisor(uri: str):
    from controller.hypervisor import Hypervisor, HypervisorError

    try:
        return Hypervisor(uri)
    except HypervisorError as e:
        click.echo(f"error: cannot reach the hypervisor: {e}", err=True)
        sys.exit(EXIT_ERROR)


@cli.command()
@click.argument("path", required=False, type=click.Path(path_type=Path), default=Path("."))
@_target_options
@click.option("-f", "--format", "fmt", type=click.Choice(("text", "json", "markdown")), default="text",
              show_default=True,
              help="text: for a terminal; json: specs/plan.md; markdown: pull-request comments, several when "
                   "one would pass 65536 characters, separated by a line `<!-- vmflow: next comment -->`.")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Save the plan; `vmflow apply FILE` applies exactly it, or refuses if the VMs changed since.")
@click.option("--base", "base_ref", metavar="REF",
              help="Preview a pull request: compile PATH at this git revision and at --head, straight from git "
                   "(no checkout), and show what the change does to the program. No hypervisor is asked "
                   "unless --libvirt is given.")
@click.option("--head", "head_ref", metavar="REF",
              help="The revision --base is compared with (default: HEAD, the committed head; uncommitted "
                   "changes are not read).")
@_no_color_option
def plan(path: Path, state_dir, libvirt_uri, image_root, prune, allow_mass_delete, fmt, out, base_ref, head_ref,
         no_color) -> None:
    """Show what applying the program would change, and why.

    Compares the program with what libvirt reports: `+` create, `~` update live, `~!` update with a
    restart, `-/+` replace, `-` destroy. Drift (changes made outside vmflow) is listed first.

    With --base REF, previews a pull request instead: both revisions are compiled from the git repository
    holding PATH, the head's VMs are planned against the base's as if the base had been applied, and the
    other blocks (pools, morph rules, chains, reservations) that were added, removed or changed are listed.
    With --libvirt URI the live plan of the head is shown too. `--format markdown` gives one pull-request
    comment whose first line, a hidden `<!-- vmflow-preview ... -->` marker, lets CI update it in place.

    \b
    Exit codes: 0 no changes, 2 changes to apply, 1 error (with --base: the head does not compile, or a
    revision is unknown).
    \b
    Examples:
      vmflow plan examples/web
      vmflow plan examples/web -o web.plan.json && vmflow apply web.plan.json
      vmflow plan infra/web --base origin/main                  # what this branch changes
      vmflow plan infra/web --base "$BASE_SHA" --head "$HEAD_SHA" --format markdown > plan.md   # in CI
    """
    from controller import render_plan
    from controller.context import image_notes, make_plan, vm_to_json

    if base_ref is not None:
        if out is not None:
            raise click.UsageError("--out saves a plan to apply; a preview (--base) is not one")
        _plan_preview(path, base_ref, head_ref or "HEAD", fmt, libvirt_uri, state_dir, image_root, prune,
                      allow_mass_delete, no_color)
    if head_ref is not None:
        raise click.UsageError("--head goes with --base")
    t = _load_target(path, libvirt_uri, state_dir, no_color, image_root)
    with _open_hypervisor(t.uri) as hv:
        p, actual = make_plan(t, hv, prune, allow_mass_delete)
        for note in image_notes(t, hv):
            click.echo(f"note: {note}", err=True)
    observed = render_plan.fingerprint(actual, [c.address for c in p.changes])
    doc = render_plan.to_json(p, program=t.program, observed=observed)
    if out is not None:
        saved = dict(doc, source=str(t.program_dir), uri=t.uri, state_dir=str(t.state_dir),
                     image_root=str(t.image_root),
                     desired={n: vm_to_json(v) for n, v in t.desired.items()},
                     options={"prune": prune, "allow_mass_delete": allow_mass_delete})
        out.write_text(json.dumps(saved, indent=2, default=str) + "\n")
    if fmt == "json":
        click.echo(json.dumps(doc, indent=2, default=str))
    elif fmt == "markdown":
        bodies = render_plan.render_markdown(p, program=t.program, unmanaged=len(actual.unmanaged))
        click.echo(f"\n{render_plan.MARKDOWN_BREAK}\n".join(bodies), nl=False)
    else:
        unmanaged = len(actual.unmanaged)
        click.echo(render_plan.render_text(p, _colour(no_color), unmanaged), nl=False)
        if out is not None:
            click.echo(f"Saved the plan to {out}; apply exactly it with `vmflow apply {out}`.")
    if not p.applyable:
        sys.exit(EXIT_ERROR)
    sys.exit(EXIT_CHANGES if p.actionable else EXIT_OK)


def _plan_preview(path: Path, base_ref: str, head_ref: str, fmt: str, libvirt_uri, state_dir, image_root, prune: bool,
                  allow_mass_delete: bool, no_color: bool) -> None:
    """`plan --base`: the pull-request preview, and with --libvirt the live plan of the head. Exits."""
    from compiler.program import Compiler
    from controller import preview as pv
    from controller import render_plan
    from controller.context import ContextError, make_plan, target

    if not path.exists():
        raise click.UsageError(f"`{path}` does not exist")
    try:
        p, head = pv.from_git(path, base_ref, head_ref, Compiler())
    except pv.PreviewError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_ERROR)
    live, uri, unmanaged = None, "", 0
    # A pull-request runner has no hypervisor state of its own: the embedded default is never implied here.
    if p.head_ok and libvirt_uri:
        program_dir = path.resolve() if path.is_dir() else path.resolve().parent
        try:
            t = target(head, p.program, program_dir, libvirt_uri,
                       (state_dir or program_dir / ".vmflow").resolve(), image_root)
        except ContextError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_ERROR)
        with _open_hypervisor(t.uri) as hv:
            live, actual = make_plan(t, hv, prune, allow_mass_delete)
        uri, unmanaged = libvirt_uri, len(actual.unmanaged)
    if fmt == "json":
        click.echo(json.dumps(pv.to_json(p, live=live, live_uri=uri or None, unmanaged=unmanaged), indent=2,
                              default=str))
    elif fmt == "markdown":
        bodies = pv.render_markdown(p, live=live, live_uri=uri, unmanaged=unmanaged)
        click.echo(f"\n{render_plan.MARKDOWN_BREAK}\n".join(bodies), nl=False)
    else:
        click.echo(pv.render_text(p, _colour(no_color), live=live, live_uri=uri, unmanaged=unmanaged), nl=False)
    if not p.head_ok:
        click.echo(f"error: `{p.program}` does not compile at {p.head.label} "
                   f"({render.summary(list(p.diagnostics))})", err=True)
        sys.exit(EXIT_ERROR)
    if not p.plan.applyable or (live is not None and not live.applyable):
        sys.exit(EXIT_ERROR)
    sys.exit(EXIT_CHANGES if p.has_changes or (live is not None and live.actionable) else EXIT_OK)


@cli.command()
@click.argument("target", required=False, type=click.Path(path_type=Path), default=Path("."))
@_target_options
@click.option("--auto-approve", is_flag=True, help="Apply without asking.")
@click.option("--lock-timeout", type=float, default=0.0, show_default=True,
              help="Seconds to wait for another apply of the same program to finish.")
@click.option("--keep-snapshots", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Snapshots vmflow keeps per VM; older ones are deleted.")
@click.option("--parallelism", type=click.IntRange(1, 64), default=None,
              help="How many VMs are changed at a time. Default: 4 on a real hypervisor, 1 on the embedded "
                   "default (where changes take no time).")
@_no_color_option
def apply(target: Path, state_dir, libvirt_uri, image_root, prune, allow_mass_delete, auto_approve, lock_timeout,
          keep_snapshots, parallelism, no_color) -> None:
    """Make the VMs match the program (TARGET is a program folder, or a plan saved with `plan -o`).

    Every change to an existing VM is preceded by a snapshot and followed by a check; a change that fails
    is reverted to its snapshot and reported, and the apply goes on with the other VMs. A run that was
    killed is resumed or rolled back by the next one, which says which.

    \b
    Examples:
      vmflow apply examples/web --auto-approve
      vmflow apply web.plan.json
    """
    import getpass

    from controller import embedded, render_plan
    from controller.apply import Applier, ApplyRefused
    from controller.context import image_notes, image_repo, make_plan, open_store, vm_from_json
    from controller.store import LockHeld

    saved = None
    if target.is_file() and target.suffix == ".json":
        try:
            saved = json.loads(target.read_text())
            source = Path(saved["source"])
        except (ValueError, KeyError, OSError) as e:
            click.echo(f"error: `{target}` is not a saved plan: {e}", err=True)
            sys.exit(EXIT_ERROR)
        t = _load_target(source, saved.get("uri"), Path(saved["state_dir"]), no_color,
                         Path(saved["image_root"]) if saved.get("image_root") else image_root)
        prune = saved["options"]["prune"]
        allow_mass_delete = saved["options"]["allow_mass_delete"]
        t.desired = {n: vm_from_json(v) for n, v in saved["desired"].items()}
    else:
        t = _load_target(target, libvirt_uri, state_dir, no_color, image_root)
    colour = _colour(no_color)
    store = open_store(t)
    try:
        store.acquire(t.program, f"{getpass.getuser()}", f"vmflow apply {target}", lock_timeout)
    except LockHeld as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_ERROR)
    try:
        with _open_hypervisor(t.uri) as hv:
            save = (lambda: embedded.save(t.state_dir, hv.export())) if t.embedded else (lambda: None)
            applier = Applier(hv, store, keep_snapshots=keep_snapshots, saved=save,
                              progress=lambda m: click.echo(m, err=True), images=image_repo(t, hv),
                              health=t.health, parallelism=parallelism or (1 if t.embedded else 4))
            for note in image_notes(t, hv):
                click.echo(f"note: {note}", err=True)
            # A run killed half-way is settled first, so that the plan starts from a consistent state.
            for line in applier.recover():
                click.echo(f"recovered: {line}")
            p, actual = make_plan(t, hv, prune, allow_mass_delete)
            if saved is not None:
                now = render_plan.fingerprint(actual, [c.address for c in p.changes])
                if now != saved.get("observed") or [c["address"] for c in saved["changes"]] != \
                        [c.address for c in p.changes]:
                    click.echo("error: the saved plan is stale: the VMs changed since it was made "
                               "(by another apply, a morph or a change outside vmflow). Plan again.", err=True)
                    sys.exit(EXIT_ERROR)
            click.echo(render_plan.render_text(p, colour, len(actual.unmanaged)), nl=False)
            if not p.applyable:
                sys.exit(EXIT_ERROR)
            if not p.actionable:
                return
            if not auto_approve and saved is None:
                if not sys.stdin.isatty():
                    click.echo("error: not applying without confirmation: pass --auto-approve, or save the plan "
                               "with `vmflow plan -o FILE` and apply that file", err=True)
                    sys.exit(EXIT_ERROR)
                click.confirm("Apply these changes?", abort=True)
            started = time.monotonic()
            try:
                result = applier.apply(p, t.program)
            except ApplyRefused as e:
                click.echo(f"error: nothing was changed: {e}", err=True)
                sys.exit(EXIT_ERROR)
            for line in result.recovered:
                click.echo(f"recovered: {line}")
            n = result.counts()
            click.echo(f"Apply complete in {time.monotonic() - started:.1f}s: {n.get('applied', 0)} applied, "
                       f"{n.get('rolled-back', 0)} rolled back, {n.get('failed', 0)} failed.")
            for o in result.outcomes:
                if o.result != "applied":
                    click.echo(f"  {o.address}: {o.result}: {o.detail}")
            if not result.ok:
                sys.exit(EXIT_ERROR)
    finally:
        store.release(t.program)
        store.close()


# ------------------------------------------------------------------------------------------ the other commands

# Imported last: these modules use the helpers above.
from controller import cli_morph, cli_ops  # noqa: E402

for _command in (*cli_ops.COMMANDS, *cli_morph.COMMANDS):
    cli.add_command(_command)


# ------------------------------------------------------------------------------------------ entry point


def main() -> None:
    try:
        code = cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(EXIT_ERROR)
    except click.UsageError as e:
        e.show()
        sys.exit(EXIT_USAGE)
    except click.ClickException as e:
        e.show()
        sys.exit(EXIT_ERROR)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(EXIT_OK)
    except Exception as e:  # noqa: BLE001 - the last line of defence: no traceback for users
        if os.environ.get("VMFLOW_DEBUG"):
            raise
        click.echo(f"internal error: {type(e).__name__}: {e}\n"
                   "this is a bug in vmflow; rerun with VMFLOW_DEBUG=1 for a traceback", err=True)
        sys.exit(EXIT_INTERNAL)
    sys.exit(code or EXIT_OK)


if __name__ == "__main__":
    main()
