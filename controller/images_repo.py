"""The image repository: image files under an image root, and the per-VM disk files made from them.

Images are read-only bases. Every VM gets its own folder, `<state-dir>/disks/<vm>/`: a qcow2 overlay of its
image as its boot disk (`boot-<image>-<stamp>.qcow2`, serial `vmflow-boot`) and a qcow2 file per data disk
(`data-<disk>-<stamp>.qcow2`, serial = the disk's name). qcow2 everywhere because internal snapshots, which
apply takes before every change, refuse any other format.

A folder per VM makes ownership a matter of where a file is, never of parsing its name (VM names may contain
`-`, so `a` + `boot-x` and `a-boot` + `x` would read alike). Every file gets a new name, so nothing is ever
written over: an OS swap keeps the old overlay, and a data disk removed and added again keeps its old file,
as long as a snapshot a rollback may need still names them. Files in a VM's folder that neither the domain
nor any snapshot names are deleted after each change; a VM that is gone takes its whole folder with it.

The image root is `--image-root DIR`, else `VMFLOW_IMAGE_ROOT`, else `<state-dir>/images`. Paths in image
schemas were checked lexically by the compiler; here they are resolved again (symlinks included) and must
stay inside the root.

On libvirt's test driver nothing reads these files, so a missing image file is a note, not an error (`strict`
off), and without `qemu-img` no file is made at all.

`qemu-img` runs once per kind of file: a new qcow2 (empty, or an overlay naming its backing file by absolute
path) records nothing about its own name or place, so the next one of the same size on the same backing file
is a byte copy of the first. An apply of many VMs on one image starts one process, not one per VM.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from controller.state import DiskState

ENV_ROOT = "VMFLOW_IMAGE_ROOT"
# Fresh qcow2 files kept as templates: a few hundred KiB each, one per image (and per data disk size).
_TEMPLATES_KEPT = 16


class ImageError(Exception):
    pass


@dataclass(frozen=True)
class BootFiles:
    kernel: str
    initrd: str | None
    cmdline: str


def default_root(state_dir: Path, given: Path | None = None) -> Path:
    if given is not None:
        return given.resolve()
    env = os.environ.get(ENV_ROOT)
    return Path(env).resolve() if env else (state_dir / "images").resolve()


class ImageRepo:
    def __init__(self, root: Path, state_dir: Path, catalog=None, *, strict: bool = False) -> None:
        self.root = root.resolve()
        self.state_dir = state_dir.resolve()
        self.catalog = catalog
        self.strict = strict  # True on QEMU: a disk that cannot be made is an error
        self.qemu_img = shutil.which("qemu-img")
        self._templates: dict[tuple, bytes] = {}  # qemu-img arguments (and backing file) -> the file it made
        self._templates_lock = threading.Lock()  # applies make disks from several threads

    # -- where things are
    def _under_root(self, rel: str) -> Path:
        path = (self.root / rel).resolve()
        if path != self.root and self.root not in path.parents:
            raise ImageError(f"`{rel}` resolves to {path}, outside the image root {self.root}")
        return path

    def _image(self, image_id: str):
        return self.catalog.get(image_id) if self.catalog is not None else None

    def image_file(self, image_id: str) -> Path | None:
        """The image's qcow2 under the root; None for images without a file source (volumes, unknown)."""
        img = self._image(image_id)
        if img is None or img.source_path is None:
            return None
        return self._under_root(img.source_path)

    def boot(self, image_id: str) -> BootFiles | None:
        img = self._image(image_id)
        if img is None or img.boot is None:
            return None
        b = img.boot
        return BootFiles(str(self._under_root(b.kernel)), str(self._under_root(b.initrd)) if b.initrd else None,
                         b.cmdline)

    def missing(self, image_ids) -> list[str]:
        """One line per image whose files are not under the root (what plan and apply report)."""
        out = []
        for image_id in sorted(set(image_ids)):
            try:
                f = self.image_file(image_id)
                boot = self.boot(image_id)
            except ImageError as e:
                out.append(f"image `{image_id}`: {e}")
                continue
            wanted = [f] if f else []
            if boot:
                wanted += [Path(boot.kernel)] + ([Path(boot.initrd)] if boot.initrd else [])
            gone = [str(p) for p in wanted if not p.is_file()]
            if gone:
                out.append(f"image `{image_id}`: {', '.join(gone)} does not exist; its boot disks are not created")
        if self.qemu_img is None:
            out.append("qemu-img is not installed: no disk files are created")
        return out

    def _dir(self, *names: str) -> Path:
        """`<state-dir>/<names…>`, made where missing; every level 0755."""
        d = self.state_dir
        d.mkdir(parents=True, exist_ok=True)
        for name in names:
            d = d / name
            d.mkdir(exist_ok=True)
            os.chmod(d, 0o755)  # QEMU runs as another user (libvirt-qemu) and must reach the files
        return d

    def serial_log(self, vm: str) -> str:
        return str(self._dir("logs") / f"{vm}.serial.log")

    def vm_dir(self, vm: str) -> Path:
        """`disks/<vm>/`, the folder of every file vmflow makes for `vm` (not created here)."""
        # The compiler's names cannot hold a `/` or be `.`/`..`; observed names come from libvirt, so check.
        if not vm or "/" in vm or "\0" in vm or vm in (".", ".."):
            raise ImageError(f"`{vm}` cannot name a folder under {self.state_dir / 'disks'}")
        return self.state_dir / "disks" / vm

    def _new_path(self, vm: str, kind: str, name: str) -> Path:
        d = self._dir("disks", self.vm_dir(vm).name)  # vm_dir refuses a name that is no folder
        # A new name every time: a file that an older snapshot names must outlive the change.
        stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{time.monotonic_ns() % 1_000_000_000:09d}"
        return d / f"{kind}-{name}-{stamp}.qcow2"

    # -- making files
    def _qemu_img(self, *args: str) -> None:
        if self.qemu_img is None:
            raise ImageError("qemu-img is not installed")
        r = subprocess.run([self.qemu_img, "create", "-q", "-f", "qcow2", *args], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise ImageError(f"qemu-img create {' '.join(args)}: {r.stderr.strip()}")

    def _create(self, path: str, size: str | None = None, backing: Path | None = None) -> None:
        """A new qcow2 at `path`, which must not exist: an overlay of `backing` when given, of `size` when
        given (else the backing file's). The first file for a given (size, backing file) comes from qemu-img,
        later ones are copies of it; the backing file's identity is in the key, since its size becomes the
        overlay's."""
        if os.path.lexists(path):
            raise ImageError(f"{path} already exists: vmflow never writes over a disk file")
        args = (("-F", "qcow2", "-b", str(backing)) if backing is not None else ()) + (path,) + \
            ((size,) if size else ())
        key = (size, _identity(backing) if backing is not None else None)
        with self._templates_lock:
            data = self._templates.get(key)
            if data is None:
                self._qemu_img(*args)
                try:
                    # Read at once: no QEMU has opened the file yet.
                    self._templates[key] = Path(path).read_bytes()
                except OSError as e:
                    raise ImageError(f"cannot read {path} back: {e}") from None
                while len(self._templates) > _TEMPLATES_KEPT:
                    self._templates.pop(next(iter(self._templates)))
                return
        try:
            # 0644 like qemu-img's files: QEMU runs as another user and only reads through the owner's grant.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            raise ImageError(f"cannot create {path}: {e}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except OSError as e:
            Path(path).unlink(missing_ok=True)  # not half a disk
            raise ImageError(f"cannot write {path}: {e}") from None

    def boot_disk(self, vm: str, image_id: str) -> str | None:
        """A new overlay on the image for `vm`'s boot disk; None when there is no file to overlay (and the
        driver does not need one)."""
        base = self.image_file(image_id)
        if base is None or not base.is_file() or self.qemu_img is None:
            if self.strict:
                raise ImageError(f"image `{image_id}` has no qcow2 file under {self.root}"
                                 + (f" ({base} does not exist)" if base else ""))
            return None
        # A new name per overlay: the previous one may still hold snapshots a rollback needs.
        path = self._new_path(vm, "boot", image_id)
        self._create(str(path), backing=base)
        return str(path)

    def data_disk(self, vm: str, disk: DiskState) -> str:
        """A new qcow2 of the declared size for a data disk (an overlay of its `source` when it has one).
        Without qemu-img on the test driver: the path the file would have, which nothing reads."""
        path = str(self._new_path(vm, "data", disk.name))
        if self.qemu_img is None:
            if self.strict:
                raise ImageError("qemu-img is not installed")
            return path
        size = f"{max(disk.size_kib, 1)}K"
        if disk.source:
            base = self._under_root(disk.source)
            if not base.is_file():
                if self.strict:
                    raise ImageError(f"disk source {base} does not exist")
                return path
            self._create(path, size, backing=base)
        else:
            self._create(path, size)
        return path

    def forget_unused(self, vm: str, in_use: set[str] | frozenset[str]) -> list[str]:
        """Delete the files in `vm`'s folder that neither the domain nor any of its snapshots names (`in_use`,
        as `Hypervisor.disk_files` gives it): an OS swap's old overlay once its snapshots are pruned, a
        detached data disk, what a rolled-back or killed change made."""
        named = {os.path.realpath(f) for f in in_use}
        return self._delete(vm, lambda f: os.path.realpath(f) not in named)

    def remove_vm(self, vm: str) -> list[str]:
        """Delete `vm`'s folder and every file in it: the VM is gone (deleted, or a create that failed)."""
        gone = self._delete(vm, lambda _f: True)
        d = self.vm_dir(vm)
        try:
            d.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ImageError(f"cannot remove {d}: {e}") from None
        return gone

    def _delete(self, vm: str, unused: Callable[[str], bool]) -> list[str]:
        """Delete the files of `vm`'s folder for which `unused(path)` holds; the paths deleted."""
        d = self.vm_dir(vm)
        gone = []
        try:
            entries = sorted(d.iterdir())
        except FileNotFoundError:
            return gone
        except OSError as e:
            raise ImageError(f"cannot list {d}: {e}") from None
        for f in entries:
            if (f.is_file() or f.is_symlink()) and unused(str(f)):
                try:
                    f.unlink(missing_ok=True)  # a symlink goes, never what it points at
                except OSError as e:
                    raise ImageError(f"cannot delete {f}: {e}") from None
                gone.append(str(f))
        return gone


def _identity(f: Path) -> tuple:
    st = f.stat()
    return (str(f), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
