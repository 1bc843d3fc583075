"""The CI examples in examples/ci/ stay true to the command line: both YAML files parse, and every `vmflow`
command they (and their README) run names a subcommand that exists, with only options it accepts and a value
after each option that takes one. Commands are read from the workflow's `run:` scripts, the pre-commit hooks'
`entry:` lines and the README's shell blocks; `\\` continuations are joined, and GitHub `${{ }}` expressions
and shell variables stand for one argument each.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import yaml

from controller.cli import cli

CI = Path(__file__).resolve().parent.parent / "examples" / "ci"
WORKFLOW = CI / "github-actions.yml"
PRE_COMMIT = CI / "pre-commit-config.yaml"
README = CI / "README.md"
# Where a new command starts in a shell line.
_SEPARATORS = {";", "&&", "||", "|", "(", ")", "then", "do", "else", "!"}


def _strings(node, key: str):
    """Every string value under `key`, anywhere in a YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key and isinstance(v, str):
                yield v
            else:
                yield from _strings(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item, key)


def _logical_lines(script: str) -> list[str]:
    """Shell lines with `\\` continuations joined and GitHub expressions made one plain word."""
    script = re.sub(r"\\\n", " ", script)
    script = re.sub(r"\$\{\{.*?\}\}", "GITHUB_EXPRESSION", script)
    return [line for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def vmflow_commands(script: str) -> list[list[str]]:
    """The arguments of every `vmflow` command in a shell script (what follows `vmflow`, up to a redirect, a
    pipe or the end of the command)."""
    out = []
    for line in _logical_lines(script):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        tokens = list(lexer)
        for i, tok in enumerate(tokens):
            if tok == "vmflow" and (i == 0 or tokens[i - 1] in _SEPARATORS):
                args = []
                for t in tokens[i + 1:]:
                    if t in _SEPARATORS or set(t) <= set("<>&|;()") or t.startswith(">"):
                        break
                    args.append(t)
                out.append(args)
    return out


def check_command(args: list[str]) -> None:
    """`args` (after `vmflow`) is a valid command line: a known subcommand, known options, values given."""
    command: click.Command = cli
    path = ["vmflow"]
    rest = list(args)
    while isinstance(command, click.Group):
        assert rest, f"`{' '.join(path)}` needs a subcommand"
        name = rest.pop(0)
        sub = command.commands.get(name)
        assert sub is not None, f"`{' '.join(path)}` has no subcommand `{name}`"
        command, path = sub, path + [name]
    options = {}
    for p in command.params:
        if isinstance(p, click.Option):
            for opt in (*p.opts, *p.secondary_opts):
                options[opt] = p
    where = " ".join(path)
    while rest:
        tok = rest.pop(0)
        if tok == "--":
            break
        if not tok.startswith("-") or tok == "-":
            continue  # an argument
        name, eq, value = tok.partition("=")
        opt = options.get(name)
        assert opt is not None, f"`{where}` has no option `{name}` (it has {', '.join(sorted(options))})"
        if opt.is_flag or opt.count:
            assert not eq, f"`{where} {name}` is a flag and takes no value"
            continue
        if not eq:
            assert rest and not (rest[0].startswith("-") and rest[0] != "-"), f"`{where} {name}` needs a value"
            value = rest.pop(0)
        if isinstance(opt.type, click.Choice) and value not in ("GITHUB_EXPRESSION",) and "$" not in value:
            assert value in opt.type.choices, f"`{where} {name}` takes one of {opt.type.choices}, not `{value}`"


def _workflow_commands() -> list[list[str]]:
    doc = yaml.safe_load(WORKFLOW.read_text())
    return [c for script in _strings(doc, "run") for c in vmflow_commands(script)]


def _pre_commit_commands() -> list[list[str]]:
    doc = yaml.safe_load(PRE_COMMIT.read_text())
    out = []
    for repo in doc["repos"]:
        for hook in repo["hooks"]:
            out.extend(vmflow_commands(" ".join([hook["entry"], *hook.get("args", [])])))
    return out


def _readme_commands() -> list[list[str]]:
    blocks = re.findall(r"^```(?:sh|bash|shell)\n(.*?)^```", README.read_text(), re.DOTALL | re.MULTILINE)
    return [c for b in blocks for c in vmflow_commands(b)]


# ------------------------------------------------------------------------------------------ the files


def test_workflow_is_a_pull_request_workflow() -> None:
    doc = yaml.safe_load(WORKFLOW.read_text())
    # YAML 1.1 reads the key `on` as true.
    on = doc.get("on", doc.get(True))
    assert "pull_request" in on
    steps = [s for job in doc["jobs"].values() for s in job["steps"]]
    checkout = next(s for s in steps if str(s.get("uses", "")).startswith("actions/checkout"))
    assert checkout["with"]["fetch-depth"] == 0, "plan --base needs both revisions in the clone"
    script = next(s for s in steps if str(s.get("uses", "")).startswith("actions/github-script"))["with"]["script"]
    assert "<!-- vmflow-preview " in script and "updateComment" in script and "createComment" in script
    assert "<!-- vmflow: next comment -->" in script


def test_workflow_runs_the_three_checks() -> None:
    commands = _workflow_commands()
    subcommands = [c[0] for c in commands]
    assert {"fmt", "validate", "plan"} <= set(subcommands), commands
    [plan] = [c for c in commands if c[0] == "plan"]
    assert "--base" in plan and "--head" in plan and plan[plan.index("--format") + 1] == "markdown"
    assert any(c[0] == "validate" and "github" in c for c in commands)
    assert any(c[0] == "fmt" and "--check" in c for c in commands)


def test_pre_commit_hooks() -> None:
    doc = yaml.safe_load(PRE_COMMIT.read_text())
    hooks = [h for r in doc["repos"] for h in r["hooks"]]
    assert all(r["repo"] == "local" for r in doc["repos"])
    assert all(h["language"] == "system" and h["files"] == r"\.flow$" for h in hooks)
    assert [c[0] for c in _pre_commit_commands()] == ["fmt", "validate"]


@pytest.mark.parametrize("source", ["workflow", "pre-commit", "readme"])
def test_every_vmflow_command_line_is_valid(source: str) -> None:
    commands = {"workflow": _workflow_commands, "pre-commit": _pre_commit_commands,
                "readme": _readme_commands}[source]()
    assert commands, f"no vmflow command found in the {source}"
    for args in commands:
        check_command(args)


# ------------------------------------------------------------------------------------------ the checker


@pytest.mark.parametrize("line", [
    "vmflow plna examples/web",
    "vmflow plan --bsae main",
    "vmflow plan --base",
    "vmflow fmt --check=yes",
    "vmflow validate --format yaml",
    "vmflow import",
    "vmflow import workflow --nope x.json",
])
def test_the_checker_catches_wrong_lines(line: str) -> None:
    [args] = vmflow_commands(line)
    with pytest.raises(AssertionError):
        check_command(args)


def test_the_checker_reads_shell() -> None:
    script = ('if true; then vmflow plan "$p" \\\n  --base ${{ github.event.pull_request.base.sha }} \\\n'
              '  --format markdown > "out/$slug.md" || code=$?; fi\n'
              "echo vmflow is not a command here\n")
    assert vmflow_commands(script) == [["plan", "$p", "--base", "GITHUB_EXPRESSION", "--format", "markdown"]]
