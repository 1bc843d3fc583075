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
from controller.images_repo import ImageError, ImageRepo
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


@pytest.fixture
def qemu_img_runs(repo, monkeypatch) -> list[tuple]:
    """Every qemu-img run the repository makes."""
    runs: list[tuple] = []
    real = repo._qemu_img

    def counted(*args):
        runs.append(args)
        real(*args)
    monkeypatch.setattr(repo, "_qemu_img", counted)
    return runs


def test_later_overlays_are_copies_that_qemu_reads_as_overlays(repo, qemu_img_runs):
    a = repo.boot_disk("web", "linux-base")
    b = repo.boot_disk("api", "linux-base")
    c = repo.boot_disk("db", "linux-base-large")
    d = repo.boot_disk("cache", "linux-base")
    assert len({a, b, c, d}) == 4
    assert len(qemu_img_runs) == 2  # one per image; `api` and `cache` got copies of `web`'s
    assert Path(a).read_bytes() == Path(b).read_bytes() == Path(d).read_bytes()
    for path, image in ((a, "linux-base"), (b, "linux-base"), (c, "linux-base-large"), (d, "linux-base")):
        got = info(path)
        assert got["format"] == "qcow2" and got["virtual-size"] == 8 * 1024 * 1024
        assert got["backing-filename"] == str(repo.root / f"{image}.qcow2")
    # Copies are readable by QEMU's user and no one else may write them, like qemu-img's own files.
    assert {os.stat(p).st_mode & 0o777 for p in (b, d)} == {0o644}


def test_a_changed_image_gets_a_fresh_overlay(repo, qemu_img_runs):
    first = repo.boot_disk("web", "linux-base")
    base = repo.root / "linux-base.qcow2"
    base.unlink()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    second = repo.boot_disk("api", "linux-base")
    assert len(qemu_img_runs) == 2
    assert info(first)["virtual-size"] == 8 * 1024 * 1024
    assert info(second)["virtual-size"] == 16 * 1024 * 1024


def test_data_disks_of_each_size(repo, qemu_img_runs):
    one = repo.data_disk("web", DiskState("data", size_kib=1024, source=None))
    two = repo.data_disk("api", DiskState("data", size_kib=1024, source=None))
    big = repo.data_disk("db", DiskState("data", size_kib=4096, source=None))
    assert len(qemu_img_runs) == 2
    assert [info(p)["virtual-size"] for p in (one, two, big)] == [1 << 20, 1 << 20, 4 << 20]
    assert "backing-filename" not in info(one)


def test_a_disk_added_again_is_a_new_file_and_the_old_one_is_kept(repo):
    """A snapshot taken before the disk was detached still names the old file: it must keep its data."""
    old = repo.data_disk("web", DiskState("data", size_kib=1024, source=None))
    Path(old).write_bytes(b"the old disk's data")
    new = repo.data_disk("web", DiskState("data", size_kib=1024, source=None))
    assert new != old and Path(old).read_bytes() == b"the old disk's data"
    assert info(new)["format"] == "qcow2"


def test_files_of_vms_whose_names_run_together_stay_apart(repo):
    """VM `a` with disk `x-y` and VM `a-x` with disk `y`; VM `a` and VM `a-boot-x`: each VM's files are in
    its own folder, so removing one VM's never touches the other's."""
    a = repo.data_disk("a", DiskState("x-y", size_kib=1024, source=None))
    ax = repo.data_disk("a-x", DiskState("y", size_kib=1024, source=None))
    a_boot = repo.boot_disk("a", "linux-base")
    theirs = repo.boot_disk("a-boot-x", "linux-base")
    assert len({a, ax, a_boot, theirs}) == 4
    assert sorted(repo.remove_vm("a")) == sorted([a, a_boot])
    assert not repo.vm_dir("a").exists()
    assert os.path.exists(ax) and os.path.exists(theirs)


def test_forget_unused_keeps_what_is_still_named(repo, tmp_path):
    old = repo.boot_disk("web", "linux-base")
    new = repo.boot_disk("web", "linux-base-large")
    data = repo.data_disk("web", DiskState("data", size_kib=1024, source=None))
    outside = tmp_path / "precious.qcow2"
    outside.write_bytes(b"not vmflow's")
    os.symlink(outside, repo.vm_dir("web") / "link.qcow2")
    other = repo.boot_disk("api", "linux-base")
    # As libvirt names them: the same files, by a path that may differ in spelling.
    named = {old, data.replace("/disks/", "/disks/./")}
    assert sorted(repo.forget_unused("web", named)) == sorted([new, str(repo.vm_dir("web") / "link.qcow2")])
    assert os.path.exists(old) and os.path.exists(data) and os.path.exists(other)
    assert outside.read_bytes() == b"not vmflow's"  # a symlink goes, never what it points at
    assert repo.forget_unused("nobody", set()) == []


@pytest.mark.parametrize("name", ["..", ".", "a/b", ""])
def test_a_name_that_is_not_a_folder_is_refused(repo, name):
    with pytest.raises(ImageError, match="cannot name a folder"):
        repo.remove_vm(name)
