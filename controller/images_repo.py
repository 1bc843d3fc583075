"""The image repository: image files under an image root, and the per-VM disk files made from them.

Images are read-only bases. Every VM gets its own files under `<state-dir>/disks/`: a qcow2 overlay of its
image as its boot disk (serial `vmflow-boot`) and a qcow2 file per data disk (serial = the disk's name).
qcow2 everywhere because internal snapshots, which apply takes before every change, refuse any other format.
An OS swap makes a new overlay on the new image and keeps the old one: snapshots taken before the swap live
inside it, and a rollback needs them.

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
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

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

    def _dir(self, name: str) -> Path:
        d = self.state_dir / name
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)  # QEMU runs as another user (libvirt-qemu) and must reach the files
        return d

    def serial_log(self, vm: str) -> str:
        return str(self._dir("logs") / f"{vm}.serial.log")

    def data_disk_path(self, vm: str, disk: str) -> str:
        return str(self.state_dir / "disks" / f"{vm}-{disk}.qcow2")

    # -- making files
    def _qemu_img(self, *args: str) -> None:
        if self.qemu_img is None:
            raise ImageError("qemu-img is not installed")
        r = subprocess.run([self.qemu_img, "create", "-q", "-f", "qcow2", *args], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise ImageError(f"qemu-img create {' '.join(args)}: {r.stderr.strip()}")

    def _create(self, path: str, size: str | None = None, backing: Path | None = None) -> None:
        """A new qcow2 at `path`: an overlay of `backing` when given, of `size` when given (else the backing
        file's). The first file for a given (size, backing file) comes from qemu-img, later ones are copies of
        it; the backing file's identity is in the key, since its size becomes the overlay's. A path that
        already exists goes to qemu-img, which refuses a file a running QEMU holds (a copy would not)."""
        args = (("-F", "qcow2", "-b", str(backing)) if backing is not None else ()) + (path,) + \
            ((size,) if size else ())
        if os.path.lexists(path):
            self._qemu_img(*args)
            return
        key = (size, _identity(backing) if backing is not None else None)
        with self._templates_lock:
            data = self._templates.get(key)
            if data is None:
                self._qemu_img(*args)
                # Read at once: no QEMU has opened the file yet.
                self._templates[key] = Path(path).read_bytes()
                while len(self._templates) > _TEMPLATES_KEPT:
                    self._templates.pop(next(iter(self._templates)))
                return
        try:
            with open(path, "xb") as f:
                try:
                    f.write(data)
                except OSError:
                    os.unlink(path)  # not half a disk
                    raise
        except OSError as e:
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
        stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{time.monotonic_ns() % 1_000_000:06d}"
        path = self._dir("disks") / f"{vm}-boot-{image_id}-{stamp}.qcow2"
        self._create(str(path), backing=base)
        return str(path)

    def data_disk(self, vm: str, disk: DiskState) -> str:
        """A new qcow2 of the declared size for a data disk (an overlay of its `source` when it has one).
        Made afresh: a disk being added is empty, whatever a former VM of the same name left behind."""
        path = self.data_disk_path(vm, disk.name)
        if self.qemu_img is None:
            if self.strict:
                raise ImageError("qemu-img is not installed")
            return path
        self._dir("disks")
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

    def _boot_overlay_of(self, vm: str, f: Path) -> bool:
        """Whether `f` is one of `vm`'s boot overlays, named `<vm>-boot-<image>-<stamp>.qcow2`. VM names may
        contain `-boot-` themselves: `a-boot-x-boot-img-….qcow2` is VM `a-boot-x`'s overlay of `img`, not
        VM `a`'s of `x-boot-img`, unless `x-boot-img` is an image of the catalog."""
        m = _BOOT_OVERLAY.fullmatch(f.name)
        if m is None or not m.group(1).startswith(f"{vm}-boot-"):
            return False
        image = m.group(1)[len(vm) + len("-boot-"):]
        return (self.catalog is not None and image in self.catalog) or "-boot-" not in image

    def forget_boot_disks(self, vm: str, in_use: set[str] | frozenset[str]) -> list[str]:
        """Delete `vm`'s boot overlays that neither the domain nor any of its snapshots names any more."""
        gone = []
        for f in sorted((self.state_dir / "disks").glob(f"{vm}-boot-*.qcow2")):
            if self._boot_overlay_of(vm, f) and str(f) not in in_use:
                f.unlink(missing_ok=True)
                gone.append(str(f))
        return gone

    def remove_vm_files(self, vm: str, data_disks: list[str], keep: set[str] | frozenset[str] = frozenset()
                        ) -> list[str]:
        """Delete the files vmflow made for `vm` that nothing names any more: its boot overlays and the named
        data disks, except the files in `keep` (what the domain and its snapshots still name; nothing, for a
        VM that is gone). Only files inside this repository's `disks/` folder are touched."""
        gone = self.forget_boot_disks(vm, keep)
        disks = (self.state_dir / "disks").resolve()
        for name in data_disks:
            path = self.data_disk_path(vm, name)
            f = Path(path).resolve()
            if path not in keep and str(f) not in keep and f.parent == disks and f.exists():
                f.unlink()
                gone.append(str(f))
        return gone


# `<vm>-boot-<image>` then the stamp boot_disk() writes: the time to the second and six digits more.
_BOOT_OVERLAY = re.compile(r"(.+)-\d{8}T\d{6}-\d{6}\.qcow2")


def _identity(f: Path) -> tuple:
    st = f.stat()
    return (str(f), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
