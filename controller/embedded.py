"""The embedded default: libvirt's test driver, with its state kept in the state directory between commands.

The test driver keeps domains in memory for one process; given a node file (`test:///abs/path.xml`) it
reads its starting state from that file at every connection. So vmflow opens the test driver on
`<state-dir>/hypervisor.xml` and, after every change, writes the whole state back to that file: each
domain's XML with its run state and its snapshots in the test driver's own XML namespace. The file is
replaced atomically, so a command killed half-way leaves the previous state, never a torn file.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"
NODE_FILE = "hypervisor.xml"
_RUNNING, _SHUTOFF = 1, 5


def node_path(state_dir: Path) -> Path:
    return state_dir / NODE_FILE


def uri(state_dir: Path) -> str:
    """The libvirt URI of the embedded hypervisor; creates an empty node file the first time."""
    path = node_path(state_dir).resolve()
    for stray in path.parent.glob(".hypervisor-*.xml"):  # left by a process killed while saving
        stray.unlink(missing_ok=True)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, "<node>\n</node>\n")
    return f"test://{path}"


def is_embedded(u: str) -> bool:
    return u.startswith("test:///") and u != "test:///default"


def _domain_entry(domain_xml: str, running: bool, snapshots: list[tuple[str, bool]]) -> str:
    """One domain as the test driver's node file wants it: run state and snapshots inside the element."""
    extra = [f"<test:runstate>{_RUNNING if running else _SHUTOFF}</test:runstate>"]
    for snap_xml, current in snapshots:
        inner = re.sub(r"^\s*<domainsnapshot>|</domainsnapshot>\s*$", "", snap_xml)
        extra.append(f"<test:domainsnapshot>{inner}<active>{1 if current else 0}</active></test:domainsnapshot>")
    head = re.match(r"<domain\b[^>]*>", domain_xml)
    if head is None:  # pragma: no cover - libvirt always writes a <domain> root
        raise ValueError("not a domain XML")
    opening = re.sub(r"\s+id='[^']*'", "", head.group(0))
    opening = opening[:-1] + f" xmlns:test='{TEST_NS}'>"
    return opening + "".join(extra) + domain_xml[head.end():]


def save(state_dir: Path, domains: list[tuple[str, bool, list[tuple[str, bool]]]]) -> None:
    """Write the whole hypervisor state: (domain XML, running, [(snapshot XML, is current)]) per domain."""
    body = "\n".join(_domain_entry(*d) for d in domains)
    _write_atomic(node_path(state_dir).resolve(), f"<node>\n{body}\n</node>\n")


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".hypervisor-", suffix=".xml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
