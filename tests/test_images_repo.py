"""The image repository (controller/images_repo.py): the disk files it makes, and which ones it may delete.
Real qcow2 files made by qemu-img, read back by `qemu-img info`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from compiler.images import load_builtin
from compiler.source import SourceSet
from controller.images_repo import ImageRepo
from controller.state import DiskState
from tests.integration.harness import unavailable


@pytest.fixture
def repo(tmp_path: Path) -> ImageRepo:
    if shutil.which("qemu-img") is None:
        unavailable("qemu-img is not installed (scripts/setup-libvirt.sh installs it)")
    root = tmp_path / "images"
    root.mkdir()
    for image in ("linux-base", "linux-base-large"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(root / f"{image}.qcow2"), "8M"], check=True)
    catalog, diags = load_builtin(SourceSet())
    assert diags == []
    return ImageRepo(root, tmp_path / "state", catalog, strict=True)


def info(path: str) -> dict:
    r = subprocess.run(["qemu-img", "info", "--output=json", path], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def test_later_overlays_are_copies_that_qemu_reads_as_overlays(repo):
    a = repo.boot_disk("web", "linux-base")
    b = repo.boot_disk("api", "linux-base")
    c = repo.boot_disk("db", "linux-base-large")
    assert len({a, b, c}) == 3
    assert Path(a).read_bytes() == Path(b).read_bytes()
    for path, image in ((a, "linux-base"), (b, "linux-base"), (c, "linux-base-large")):
        got = info(path)
        assert got["format"] == "qcow2" and got["virtual-size"] == 8 * 1024 * 1024
        assert got["backing-filename"] == str(repo.root / f"{image}.qcow2")


def test_a_changed_image_gets_a_fresh_overlay(repo):
    first = repo.boot_disk("web", "linux-base")
    base = repo.root / "linux-base.qcow2"
    base.unlink()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    second = repo.boot_disk("api", "linux-base")
    assert info(first)["virtual-size"] == 8 * 1024 * 1024
    assert info(second)["virtual-size"] == 16 * 1024 * 1024


def test_data_disks_of_each_size(repo):
    one = repo.data_disk("web", DiskState("data", size_kib=1024, source=None))
    two = repo.data_disk("api", DiskState("data", size_kib=1024, source=None))
    big = repo.data_disk("db", DiskState("data", size_kib=4096, source=None))
    assert [info(p)["virtual-size"] for p in (one, two, big)] == [1 << 20, 1 << 20, 4 << 20]
    assert "backing-filename" not in info(one)


def test_an_existing_file_is_made_afresh_not_copied_over(repo):
    path = repo.data_disk("web", DiskState("data", size_kib=1024, source=None))
    Path(path).write_bytes(b"not a disk")
    assert repo.data_disk("web", DiskState("data", size_kib=1024, source=None)) == path
    assert info(path)["format"] == "qcow2"


def test_a_vm_whose_name_extends_another_keeps_its_overlays(repo):
    """`a-boot-x` is a valid VM name: forgetting VM `a`'s overlays must not take VM `a-boot-x`'s."""
    mine = repo.boot_disk("a", "linux-base")
    theirs = repo.boot_disk("a-boot-x", "linux-base")
    assert repo.forget_boot_disks("a", set()) == [mine]
    assert os.path.exists(theirs)
    assert repo.remove_vm_files("a-boot-x", []) == [theirs]


def test_remove_vm_files_keeps_what_is_still_named(repo):
    old = repo.boot_disk("web", "linux-base")
    new = repo.boot_disk("web", "linux-base-large")
    data = repo.data_disk("web", DiskState("data", size_kib=1024, source=None))
    assert sorted(repo.remove_vm_files("web", ["data"], keep={old, data})) == [new]
    assert os.path.exists(old) and os.path.exists(data)
    assert sorted(repo.remove_vm_files("web", ["data"])) == sorted([old, str(Path(data).resolve())])
