#!/usr/bin/env bash
# Build the tiny real test guest from Debian packages:
#
#   OUTDIR/vmlinuz      Debian cloud kernel (every virtio driver is a module there)
#   OUTDIR/initrd.gz    gzip cpio (newc): busybox-static userland, the virtio modules,
#                       qemu-guest-agent with its libraries, and /init (a busybox script)
#   OUTDIR/root.qcow2   64 MiB ext4 data disk in qcow2, because libvirt refuses internal
#                       snapshots of a domain that has no disk or a non-qcow2 disk.
#                       Give every domain its own overlay of it (see tests/integration/guest.py).
#   OUTDIR/manifest.txt package versions that went in
#   OUTDIR/.stamp       hash of this script; a matching stamp + artifacts = nothing to do
#
# The guest's "application" is a process named `nginx` (/usr/sbin/nginx, a shell script that
# runs busybox httpd on port 80 serving /www). /init starts it when the kernel command line
# carries `vmflow.app=1`; inside the guest `/sbin/appctl start|stop|status` controls it at
# run time. A health check can be `pidof nginx` or `wget -q -O - http://127.0.0.1/` through
# the guest agent (guest-exec).
#
# Usage: build-guest.sh OUTDIR      (as root; apt lists must be reachable for the first build)
# Env:   VMFLOW_GUEST_CACHE         where .debs are kept between builds (default /var/cache/vmflow-guest)
#        VMFLOW_GUEST_KERNEL_PKG    force a kernel package (default: what linux-image-cloud-amd64 depends on)
set -euo pipefail

say() { printf '[build-guest] %s\n' "$*"; }
die() { printf '[build-guest] ERROR: %s\n' "$*" >&2; exit 1; }

[[ $# -eq 1 ]] || die "usage: $0 OUTDIR"
OUTDIR=$1
CACHE=${VMFLOW_GUEST_CACHE:-/var/cache/vmflow-guest}
SELF=$(readlink -f "$0")
HASH=$(sha256sum "$SELF" | cut -d' ' -f1)
ARTIFACTS=(vmlinuz initrd.gz root.qcow2)

# --- idempotence -------------------------------------------------------------------------
have_all=1
for f in "${ARTIFACTS[@]}"; do [[ -s "$OUTDIR/$f" ]] || have_all=0; done
if ((have_all)) && [[ -f "$OUTDIR/.stamp" ]] && [[ "$(cat "$OUTDIR/.stamp")" == "$HASH" ]]; then
    say "up to date in $OUTDIR (stamp matches)"
    exit 0
fi

[[ $(id -u) -eq 0 ]] || die "must run as root (writes the .deb cache, may apt-get install host tools)"
T0=$(date +%s.%N)

# --- host tools ----------------------------------------------------------------------------
# cpio/gzip pack the initramfs, qemu-img makes the qcow2, mke2fs (e2fsprogs) the ext4 in it.
need=()
command -v cpio >/dev/null || need+=(cpio)
command -v gzip >/dev/null || need+=(gzip)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v mke2fs >/dev/null || need+=(e2fsprogs)
if ((${#need[@]})); then
    say "installing host tools: ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

mkdir -p "$CACHE/debs" "$OUTDIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vmflow-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- which packages --------------------------------------------------------------------------
# The versioned kernel package is what the cloud meta-package depends on in the current lists.
# `apt-cache depends` answers from the local lists: refresh them once if they are empty/stale.
kernel_pkg() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '$1=="Depends:" && $2 ~ /^linux-image-.*-cloud-amd64$/ {print $2; exit}'
}
KPKG=${VMFLOW_GUEST_KERNEL_PKG:-$(kernel_pkg)}
if [[ -z "$KPKG" ]]; then
    say "apt lists lack linux-image-cloud-amd64: apt-get update"
    apt-get update -qq
    KPKG=$(kernel_pkg)
fi
[[ -n "$KPKG" ]] || die "no linux-image-*-cloud-amd64 offered by apt"
KVER=${KPKG#linux-image-}
say "kernel package: $KPKG"

# Download packages into the cache unless the exact files apt would fetch are already there;
# prints one .deb path per package. One apt call for all: each costs ~1.5 s here.
# `--print-uris` gives the file name apt uses (epoch ':' encoded as %3a) and its size; it is
# asked from an empty dir because it prints nothing for a file already in the cwd.
# APT::Sandbox::User=root: the cache dir is root-only, the _apt user could not write it.
fetch() {
    local uris file size want=()
    uris=$(cd "$WORK" && apt-get download --print-uris "$@" 2>"$WORK/apt.err") ||
        die "apt-get download $*: $(cat "$WORK/apt.err")"
    uris=$(grep "^'" <<<"$uris") || die "apt-get download --print-uris $* printed no file"
    while read -r _ file size _; do
        [[ -f "$CACHE/debs/$file" && $(stat -c %s "$CACHE/debs/$file") == "$size" ]] || want+=("${file%%_*}")
    done <<<"$uris"
    if ((${#want[@]})); then
        (cd "$CACHE/debs" && apt-get -o APT::Sandbox::User=root download -qq "${want[@]}" >/dev/null) ||
            die "apt-get download ${want[*]} failed"
    fi
    while read -r _ file _; do
        [[ -f "$CACHE/debs/$file" ]] || die "apt-get download did not produce $file"
        echo "$CACHE/debs/$file"
    done <<<"$uris"
}

X=$WORK/x          # packages unpacked here
R=$WORK/root       # the initramfs tree
mkdir -p "$X" "$R"
MANIFEST=$WORK/manifest.txt
: >"$MANIFEST"
T_DL=$(date +%s.%N)
DEBS=$(fetch "$KPKG" busybox-static qemu-guest-agent)
while read -r deb; do
    say "unpack $(basename "$deb")"
    dpkg-deb -x "$deb" "$X"
    dpkg-deb -f "$deb" Package Version | paste -sd' ' | sed 's/^Package: \(.*\) Version: /\1 /' >>"$MANIFEST"
done <<<"$DEBS"
QGA_DEB=$(grep '/qemu-guest-agent_' <<<"$DEBS")
T_DL_DONE=$(date +%s.%N)

# --- userland: busybox ------------------------------------------------------------------------
BB=$X/bin/busybox
[[ -x "$BB" ]] || die "busybox-static did not provide /bin/busybox"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,run,tmp,etc,root,www,data,lib/modules,var/log}
ln -s ../run "$R/var/run"
install -m 0755 "$BB" "$R/bin/busybox"
# One symlink per applet, at the path busybox itself declares (bin/, sbin/, usr/bin/, ...).
while read -r path; do
    [[ -e "$R/$path" || -L "$R/$path" ]] && continue
    [[ "$path" == */* ]] && [[ ! -d "$R/${path%/*}" ]] && mkdir -p "$R/${path%/*}"
    ln -s /bin/busybox "$R/$path"
done < <("$BB" --list-full)

# --- kernel + modules -----------------------------------------------------------------------
cp "$X/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
MODDIR=$X/lib/modules/$KVER/kernel
# Load order matters: the .deb has no modules.dep, so dependencies go first by hand.
MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk
         failover net_failover virtio_net virtio_balloon virtio_console fuse virtiofs virtio_mem
         virtio-rng evdev button)
for m in "${MODULES[@]}"; do
    ko=$(find "$MODDIR" -name "$m.ko" -print -quit)
    if [[ -z "$ko" ]]; then
        # Built into this kernel (or renamed): /init skips what is not there.
        say "module $m not found as .ko (built in?), skipped"
        continue
    fi
    cp "$ko" "$R/lib/modules/"
done
printf '%s\n' "${MODULES[@]}" >"$R/lib/modules/order"

# --- qemu-guest-agent + libraries (found with ldd) ---------------------------------------------
install -m 0755 "$X/usr/sbin/qemu-ga" "$R/usr/sbin/qemu-ga"
ldd_out=$(ldd "$X/usr/sbin/qemu-ga")
L=
if grep -q 'not found' <<<"$ldd_out"; then
    # The host lacks some runtime library: fetch qemu-ga's direct dependencies and resolve
    # against them instead (the host is the same Debian release, so the rest matches).
    say "host lacks some qemu-ga libraries; downloading its dependencies"
    L=$WORK/libs
    mkdir -p "$L"
    deps=$(dpkg-deb -f "$QGA_DEB" Depends | tr ',' '\n' | awk '$1 != "libc6" {print $1}')
    # shellcheck disable=SC2086  # one package name per word
    LIBDEBS=$(fetch $deps)
    while read -r deb; do
        dpkg-deb -x "$deb" "$L"
        dpkg-deb -f "$deb" Package Version | paste -sd' ' | sed 's/^Package: \(.*\) Version: /\1 /' >>"$MANIFEST"
    done <<<"$LIBDEBS"
    ldd_out=$(LD_LIBRARY_PATH="$L/lib/x86_64-linux-gnu:$L/usr/lib/x86_64-linux-gnu" ldd "$X/usr/sbin/qemu-ga")
fi
grep -q 'not found' <<<"$ldd_out" && die "unresolved qemu-ga libraries:"$'\n'"$ldd_out"
# Lines are "name => /path (addr)" or "/lib64/ld-linux-x86-64.so.2 (addr)"; vdso has no file.
while read -r lib; do
    # Keep the path the loader searches (/lib/x86_64-linux-gnu, /lib64), dereferenced:
    # drop the unpack dir of fetched libraries and the /usr of a merged-/usr host.
    rel=${lib#"${L:-/nonexistent}"}
    rel=${rel#/usr}
    mkdir -p "$R/${rel%/*}"
    cp -L "$lib" "$R/$rel"
done < <(awk '/=>/ {print $3; next} $1 ~ /^\// {print $1}' <<<"$ldd_out")

# --- guest files -------------------------------------------------------------------------------
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$R/etc/passwd"
printf 'root:x:0:\n' >"$R/etc/group"
printf 'vmflow-guest\n' >"$R/etc/hostname"
printf '<html><body>vmflow guest app</body></html>\n' >"$R/www/index.html"

# PID 1. Runs under busybox sh; it never exits (PID 1 exiting panics the kernel).
cat >"$R/init" <<'EOF'
#!/bin/sh
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
hostname -F /etc/hostname
echo "vmflow-guest: init on $(uname -r)"

# virtio drivers are modules in the cloud kernel and there is no modules.dep: fixed order.
for m in $(cat /lib/modules/order); do
    [ -f "/lib/modules/$m.ko" ] && insmod "/lib/modules/$m.ko" 2>/dev/null
done

# No kernel uevent helper is set: busybox uevent runs ours for each event, so hot-added
# CPUs get onlined (memory is onlined by memhp_default_state on the command line).
uevent /sbin/uevent-helper &
# CPUs that were present but offline at boot (none normally): bring them up too.
for f in /sys/devices/system/cpu/cpu[0-9]*/online; do
    [ -e "$f" ] && [ "$(cat "$f")" = 0 ] && echo 1 >"$f"
done

# ACPI power button (button + evdev modules) -> /etc/acpi/PWRF/00000080 -> poweroff.
acpid -c /etc/acpi -l /run/acpid.log

ip link set lo up
for n in /sys/class/net/eth*; do [ -e "$n" ] && ip link set "${n##*/}" up; done

# The data disk built by build-guest.sh has serial vmflow-root: mount it on /data if present.
for b in /sys/block/vd*; do
    [ -e "$b/serial" ] && [ "$(cat "$b/serial")" = vmflow-root ] && \
        mount -t ext4 "/dev/${b##*/}" /data 2>/dev/null && break
done

# The application, when asked for on the kernel command line (vmflow.app=1).
grep -qw 'vmflow.app=1' /proc/cmdline && /sbin/appctl start

# Guest agent on the virtio-serial port named org.qemu.guest_agent.0; respawned if it dies.
(
    while :; do
        port=
        for p in /sys/class/virtio-ports/*; do
            [ -e "$p/name" ] && [ "$(cat "$p/name")" = org.qemu.guest_agent.0 ] && port=/dev/${p##*/}
        done
        if [ -n "$port" ]; then
            qemu-ga -m virtio-serial -p "$port" -t /run >>/run/qemu-ga.log 2>&1
        fi
        sleep 1
    done
) &
echo "vmflow-guest: ready"

# Stay alive forever; wait reaps our own children.
while :; do sleep 3600 & wait; done
EOF
chmod 0755 "$R/init"

cat >"$R/sbin/uevent-helper" <<'EOF'
#!/bin/sh
# Called by busybox uevent with the event in the environment.
if [ "$ACTION" = add ] && [ "$SUBSYSTEM" = cpu ] && [ -w "/sys$DEVPATH/online" ]; then
    echo 1 >"/sys$DEVPATH/online"
fi
exit 0
EOF
chmod 0755 "$R/sbin/uevent-helper"

# busybox acpid ignores SIGCHLD; a sh script resets it. poweroff -f: PID 1 is not busybox init,
# so the signal-based `poweroff` would reach nobody.
mkdir -p "$R/etc/acpi/PWRF"
cat >"$R/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
sync
poweroff -f
EOF
chmod 0755 "$R/etc/acpi/PWRF/00000080"

# qemu-ga's guest-shutdown execs /sbin/shutdown (-P|-r|-H +0 "msg") and waits for its exit
# status. Busybox has no shutdown: answer at once, then sync and power off from a detached child.
cat >"$R/sbin/shutdown" <<'EOF'
#!/bin/sh
act=poweroff
for a in "$@"; do
    case "$a" in
        -r) act=reboot ;;
        -H|-h) act=halt ;;
        -P) act=poweroff ;;
    esac
done
setsid sh -c "sleep 0.3; sync; $act -f" </dev/null >/dev/null 2>&1 &
exit 0
EOF
chmod 0755 "$R/sbin/shutdown"

# The "application": a process named nginx running busybox httpd on :80 until stopped.
cat >"$R/usr/sbin/nginx" <<'EOF'
#!/bin/sh
httpd -f -p 80 -h /www &
child=$!
trap 'kill $child 2>/dev/null; exit 0' TERM INT
wait $child
EOF
chmod 0755 "$R/usr/sbin/nginx"

# Start/stop it detached, so a guest-exec of `appctl start` returns at once.
cat >"$R/sbin/appctl" <<'EOF'
#!/bin/sh
case "$1" in
    start)  pidof nginx >/dev/null || setsid /usr/sbin/nginx </dev/null >/dev/null 2>&1 & ;;
    stop)   for p in $(pidof nginx); do kill "$p"; done ;;
    status) pidof nginx >/dev/null && echo running || { echo stopped; exit 3; } ;;
    *)      echo "usage: appctl start|stop|status" >&2; exit 2 ;;
esac
EOF
chmod 0755 "$R/sbin/appctl"

# --- pack ----------------------------------------------------------------------------------------
# newc is the only cpio format the kernel unpacks; owners forced to root for a reproducible tree.
(cd "$R" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet) |
    gzip -6 >"$WORK/initrd.gz"

# Data disk: ext4 filled from a small tree, converted to qcow2 (internal snapshots need qcow2).
mkdir -p "$WORK/data"
printf 'vmflow data disk\n' >"$WORK/data/README"
truncate -s 64M "$WORK/root.raw"
mke2fs -q -t ext4 -L vmflow-root -d "$WORK/data" "$WORK/root.raw"
qemu-img convert -q -f raw -O qcow2 "$WORK/root.raw" "$WORK/root.qcow2"

# --- publish (rename into place so a reader never sees half a file) --------------------------
for f in "${ARTIFACTS[@]}" manifest.txt; do
    cp "$WORK/$f" "$OUTDIR/.$f.tmp"
    mv -f "$OUTDIR/.$f.tmp" "$OUTDIR/$f"
done
chmod 0644 "$OUTDIR"/{vmlinuz,initrd.gz,root.qcow2,manifest.txt}
echo "$HASH" >"$OUTDIR/.stamp"

T1=$(date +%s.%N)
say "built in $(awk "BEGIN{printf \"%.1f\", $T1-$T0}") s" \
    "(downloads+unpack $(awk "BEGIN{printf \"%.1f\", $T_DL_DONE-$T_DL}") s):"
stat -c '    %8s bytes  %n' "$OUTDIR"/vmlinuz "$OUTDIR"/initrd.gz "$OUTDIR"/root.qcow2
sed 's/^/    /' "$OUTDIR/manifest.txt"
