"""The Markdown rendering of a plan, for pull-request comments: a golden snapshot, splitting into several
bodies at a size limit (every body valid Markdown on its own), and `vmflow plan --format markdown` end to end.

The snapshot is tests/golden/plans/mixed.md, the bodies of the `mixed` plan case joined by
`MARKDOWN_BREAK`; `VMFLOW_BLESS=1` rewrites it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cli_runner import TWO_VMS, vmflow
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.plan import Options, plan
from controller.render_plan import MARKDOWN_BREAK, MARKDOWN_MIN_CHARS, render_markdown
from controller.state import ActualState, DiskState, NicState, Ownership, VmState
from test_golden import check_snapshot
from test_plan_golden import PLANS, PROGRAM, planned
from test_plan_property import planner_inputs

GIB_KIB = 1024 * 1024
TITLE = re.compile(r"^### vmflow plan: `.*`(?: \(part (?P<i>\d+) of (?P<n>\d+)\))?$")
FENCE = re.compile(r"^(`{3,})(.*)$")


def bodies_of(case: str, **kw) -> list[str]:
    p, actual = planned(PLANS / f"{case}.yaml")
    return render_markdown(p, program=PROGRAM, unmanaged=len(actual.unmanaged), **kw)


def check_body(body: str, max_chars: int, i: int, n: int) -> None:
    """One comment body on its own: under the limit, titled with its part, every fence and `<details>`
    closed, and nothing outside a fence that looks like a fence."""
    assert len(body) <= max_chars, f"part {i} has {len(body)} characters, more than {max_chars}"
    lines = body.split("\n")
    m = TITLE.match(lines[0])
    assert m, f"part {i} does not open with its title: {lines[0]!r}"
    if n > 1:
        assert (int(m["i"]), int(m["n"])) == (i, n), lines[0]
    else:
        assert m["i"] is None, "a plan of one body is not numbered"
    fence = None
    details = 0
    for line in lines:
        if fence is None:
            f = FENCE.match(line)
            if f:
                assert "`" not in f[2], f"{line!r} is an inline code span, not a fence"
                fence = f[1]
            details += line.count("<details") - line.count("</details>")
            assert details in (0, 1), "a <details> block inside another"
        elif re.fullmatch(rf"{fence}`*\s*", line):
            fence = None
    assert fence is None, f"part {i} of {n} ends inside a fenced block"
    assert details == 0, f"part {i} of {n} ends inside a <details> block"


def check_all(bodies: list[str], max_chars: int) -> None:
    assert bodies
    for i, body in enumerate(bodies, 1):
        check_body(body, max_chars, i, len(bodies))


# ------------------------------------------------------------------------------------------ golden


def test_markdown_snapshot() -> None:
    bodies = bodies_of("mixed")
    assert len(bodies) == 1
    check_all(bodies, 65536)
    check_snapshot(PLANS / "mixed.md", f"\n{MARKDOWN_BREAK}\n".join(bodies))


def test_details_are_open_up_to_five_changes_and_collapsed_beyond() -> None:
    few = bodies_of("devices-hotplug")[0]
    assert few.count("<details open>") == 3 and "<details>" not in few
    many = bodies_of("mixed")[0]
    assert many.count("<details>") == 6 and "<details open>" not in many


def test_drift_comes_first_and_memory_reads_as_sizes() -> None:
    body = bodies_of("drift")[0]
    assert body.index("#### Drift") < body.index("#### Changes") < body.index("#### Details")
    assert "| `vm.web` | `memory` | 4GiB | 6GiB |" in body


def test_problems_and_notes() -> None:
    body = bodies_of("mass-delete-refused")[0]
    assert "**Not applyable:** 1 problem, listed below." in body
    assert "- `program`: the plan would delete 2 of 3 owned VMs" in body
    assert "No longer declared, kept: `vm.api`, `vm.worker`." in body
    assert "#### Changes" not in body
    body = bodies_of("morphed")[0]
    assert "No changes. The VMs match the program." in body
    assert "active morphs explain the difference: `vm.batch`, `vm.web`." in body


def test_a_limit_too_small_for_any_body_is_refused() -> None:
    with pytest.raises(ValueError, match="at least"):
        bodies_of("create", max_chars=MARKDOWN_MIN_CHARS - 1)


# ------------------------------------------------------------------------------------------ splitting


def _big_plan():
    """Many VMs, drift on every one, and one VM whose diff alone is longer than a small body."""
    desired, vms = {}, {}
    for i in range(40):
        name = f"vm-{i:02d}"
        nics = (NicState("lan", "default", None, "virtio"), NicState("wan", f"net-{i}", None, "virtio"))
        desired[name] = VmState(name, "linux-base", 4, 8, 4 * GIB_KIB, 8 * GIB_KIB, (), nics, pool="rack1")
        if i % 4:
            base = {"cpu": 2, "cpu.bound": 8, "memory": 2 * GIB_KIB, "memory.bound": 8 * GIB_KIB}
            vms[name] = VmState(name, "linux-base", 3, 8 if i % 3 else 4, 3 * GIB_KIB, 8 * GIB_KIB, (), nics[:1],
                                owner=Ownership(PROGRAM, f"vm.{name}", None, base))
    disks = tuple(DiskState(f"data{d:02d}", (d + 1) * GIB_KIB, None) for d in range(120))
    desired["wide"] = VmState("wide", "linux-base", 2, 2, GIB_KIB, GIB_KIB, disks,
                              (NicState("odd", "```net``with`ticks", None, "virtio"),))
    return plan(desired, ActualState(vms), Options(device_hotplug=False, pools={"rack1": (8, None)}))


@pytest.mark.parametrize("max_chars", [MARKDOWN_MIN_CHARS, 1500, 4000, 20000, 65536])
def test_split_bodies_are_each_valid_and_under_the_limit(max_chars: int) -> None:
    p = _big_plan()
    bodies = render_markdown(p, program=PROGRAM, unmanaged=3, max_chars=max_chars)
    check_all(bodies, max_chars)
    if max_chars < 20000:
        assert len(bodies) > 1
    text = "\n".join(bodies)
    for c in p.actionable:
        assert f"| `{c.address}` |" in text, f"{c.address} is missing from the table of changes"
        assert f"<b>{c.address}</b>" in text, f"{c.address} has no details"
    for d in p.drift:
        assert f"| `{d.address}` | `{d.path}` |" in text
    for pr in p.problems:
        assert pr.message in text
    # Nothing is lost in the cut: every diff line of the wide VM is there once.
    assert sum(len(re.findall(r"^\+ disk\.data\d+\.size", b, re.M)) for b in bodies) == 120
    assert "net``with`ticks" in text


def test_one_body_when_it_fits() -> None:
    bodies = render_markdown(_big_plan(), program=PROGRAM, max_chars=10**6)
    assert len(bodies) == 1 and "(part" not in bodies[0].split("\n")[0]


@settings(max_examples=150, deadline=None)
@given(inputs=planner_inputs(), max_chars=st.integers(MARKDOWN_MIN_CHARS, 6000),
       program=st.sampled_from(("web", "a`b", "x|y")), unmanaged=st.integers(0, 3))
def test_any_plan_renders_to_valid_bodies(inputs, max_chars: int, program: str, unmanaged: int) -> None:
    p = plan(*inputs)
    bodies = render_markdown(p, program=program, unmanaged=unmanaged, max_chars=max_chars)
    check_all(bodies, max_chars)
    for c in p.actionable:
        assert any(f"<b>{c.address}</b>" in b for b in bodies)


# ------------------------------------------------------------------------------------------ CLI

PROGRAM_TEXT = TWO_VMS




def test_cli_plan_format_markdown(tmp_path: Path) -> None:
    prog = tmp_path / "shop"
    prog.mkdir()
    (prog / "main.flow").write_text(PROGRAM_TEXT)
    r = vmflow("plan", ".", "--format", "markdown", cwd=prog)
    assert r.returncode == 2, r.stderr
    bodies = r.stdout.split(f"\n{MARKDOWN_BREAK}\n")
    assert len(bodies) == 1
    check_all(bodies, 65536)
    body = bodies[0]
    assert body.startswith("### vmflow plan: `shop`\n\n**Plan: 2 to add, 0 to change (0 live, 0 restart), 0 to "
                           "replace, 0 to destroy.**\n")
    assert "| `vm.api` | `+` create | `not-found` |" in body
    assert "| `vm.web` | `+` create | `not-found` |" in body
    assert "+ nic.lan      = network default" in body

    assert vmflow("apply", ".", "--auto-approve", cwd=prog).returncode == 0
    r = vmflow("plan", ".", "--format", "markdown", cwd=prog)
    assert r.returncode == 0
    assert "No changes. The VMs match the program." in r.stdout

    text = (prog / "main.flow").read_text()
    (prog / "main.flow").write_text(text.replace("cpu    = 2 .. 8", "cpu    = 4 .. 8")
                                    .replace("cpu    = 1 .. 4", "cpu    = 1 .. 6"))
    r = vmflow("plan", ".", "--format", "markdown", cwd=prog)
    assert r.returncode == 2
    assert "| `vm.api` | `~!` update with restart | `cpu-max` |" in r.stdout
    assert "| `vm.web` | `~` update live | `cpu-live` |" in r.stdout
    assert "+ cpu.bound = 6  # forces restart" in r.stdout
    assert "<details open>" in r.stdout
