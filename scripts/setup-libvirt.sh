#!/usr/bin/env bash
# Bring up a real libvirt QEMU driver (qemu:///system) on a Debian 12 machine, as root.
#
# Idempotent: every step checks first and does nothing when already done, so tests and
# benchmarks may call it before each run. Works without systemd (containers, microVMs):
# the daemons are started directly in the background instead of through units.
#
# Environment:
#   VMFLOW_LIBVIRT_WAIT   seconds to wait for libvirtd to answer (default 60)
#   VMFLOW_SKIP_APT=1     skip the package step (machine already provisioned)
set -euo pipefail

WAIT_S="${VMFLOW_LIBVIRT_WAIT:-60}"
URI="qemu:///system"

say() { printf '[setup-libvirt] %s\n' "$*"; }
die() { printf '[setup-libvirt] ERROR: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (installs packages, starts system daemons)"

# --- 1. packages ------------------------------------------------------------------------
# libvirt-daemon + driver-qemu: the daemon and its QEMU driver, without libvirt-daemon-system
#   (that one pulls systemd units, polkit and the default NAT network, none of which we use).
# libvirt-clients: virsh, used here for the readiness probe and by people debugging.
# qemu-system-x86 + qemu-utils: the emulator (TCG here, KVM does not work) and qemu-img.
# libvirt-dev + pkg-config + gcc + python3-dev: build libvirt-python from PyPI into a venv.
# Guest build tools (build-guest.sh): busybox-static (the guest's userland, and `apt-get
#   download` alone does not need it on the host), cpio + gzip for the initramfs.
PKGS=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils
      libvirt-dev pkg-config gcc python3-dev cpio gzip)
if [[ "${VMFLOW_SKIP_APT:-0}" != 1 ]]; then
    missing=()
    for p in "${PKGS[@]}"; do
        # dpkg-query prints "install ok installed" only for fully configured packages.
        st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
        [[ "$st" == "install ok installed" ]] || missing+=("$p")
    done
    if ((${#missing[@]})); then
        say "installing: ${missing[*]}"
        t0=$(date +%s)
        export DEBIAN_FRONTEND=noninteractive
        # The lists may be absent on a fresh image: install fails with "unable to locate".
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        say "packages installed in $(( $(date +%s) - t0 )) s"
    else
        say "packages already installed"
    fi
fi

# --- 2. users, groups, directories -----------------------------------------------------
# Debian's QEMU driver runs guests as libvirt-qemu:libvirt-qemu by default (see
# /etc/libvirt/qemu.conf); those accounts are normally made by libvirt-daemon-system's
# postinst, which we do not install. /dev/kvm access is through group kvm.
getent group kvm >/dev/null || { groupadd --system kvm; say "created group kvm"; }
getent group libvirt >/dev/null || { groupadd --system libvirt; say "created group libvirt"; }
getent group libvirt-qemu >/dev/null || { groupadd --system libvirt-qemu; say "created group libvirt-qemu"; }
if ! getent passwd libvirt-qemu >/dev/null; then
    useradd --system --no-create-home --home-dir /var/lib/libvirt \
            --shell /usr/sbin/nologin -g libvirt-qemu -G kvm libvirt-qemu
    say "created user libvirt-qemu"
fi

# /dev/kvm: without udev it stays root:root 0600. libvirt probes QEMU as root (QEMU opens
# /dev/kvm before dropping to libvirt-qemu) and records "KVM enabled", then checks whether
# libvirt-qemu may open /dev/kvm, finds it may not, declares its capability cache outdated
# and re-probes QEMU (~4 s each) on every lookup: defining one domain took 80 s. Give the
# node the group/mode udev would (kvm, 0660). Guests still use TCG (<domain type='qemu'>):
# KVM here is nested and Debian guests fail on it. devtmpfs resets this at boot: rerun.
if [[ -c /dev/kvm ]]; then
    if [[ $(stat -c '%G %a' /dev/kvm) != "kvm 660" ]]; then
        chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
        say "set /dev/kvm to group kvm, mode 0660"
    fi
fi

# Runtime and state directories libvirtd/virtlogd expect; with systemd they come from
# tmpfiles.d and the -system package, here we make them ourselves.
for d in /var/log/libvirt /var/log/libvirt/qemu /var/run/libvirt /var/lib/libvirt \
         /var/lib/libvirt/qemu /var/lib/libvirt/images /var/cache/libvirt; do
    [[ -d "$d" ]] || { mkdir -p "$d"; say "created $d"; }
done

# --- 3. daemons --------------------------------------------------------------------------
# pgrep -x matches the exact process name, so a stale pid file alone does not count.
if pgrep -x virtlogd >/dev/null; then
    say "virtlogd already running"
else
    # virtlogd holds the guest serial/console log files; libvirtd refuses to start
    # guests with <log file=...> (and QEMU stdout logging) without it.
    virtlogd -d
    say "started virtlogd"
fi
if pgrep -x libvirtd >/dev/null; then
    say "libvirtd already running"
else
    libvirtd -d
    say "started libvirtd"
fi

# --- 4. readiness ------------------------------------------------------------------------
# libvirtd probes QEMU capabilities at first start (a few seconds under TCG); the socket
# exists before it answers, so probe with a real call, bounded in time.
t0=$(date +%s)
while true; do
    if out=$(timeout 10 virsh -c "$URI" version 2>&1); then
        say "$URI answers after $(( $(date +%s) - t0 )) s:"
        printf '%s\n' "$out" | sed -n 's/^/    /p'
        break
    fi
    if (( $(date +%s) - t0 >= WAIT_S )); then
        printf '%s\n' "$out" >&2
        [[ -f /var/log/libvirt/libvirtd.log ]] && tail -20 /var/log/libvirt/libvirtd.log >&2
        die "libvirtd did not answer on $URI within ${WAIT_S}s (is it running? pgrep -a libvirtd)"
    fi
    sleep 1
done
