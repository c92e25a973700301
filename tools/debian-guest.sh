#!/usr/bin/env bash
# debian-guest.sh [OUTDIR] — build exitless's default Linux guest from Debian packages.
#
# Produces, in OUTDIR (default: images/debian under the repository root):
#   vmlinuz     the bzImage of Debian's current cloud kernel (linux-image-cloud-amd64's dependency)
#   initrd.img  an UNCOMPRESSED newc cpio: busybox, the kernel's virtio/vsock modules (decompressed)
#               and an /init that loads them and gives a shell on the console.
#   initrd-tools.img  initrd.img plus mkfs.ext4, e2fsck and socat from this host, and ethtool from
#               Debian's package with its library (the tests' guest)
#   initrd-nested.img initrd-tools.img plus the KVM modules (irqbypass, kvm, kvm-amd, kvm-intel and
#               their dependencies), not loaded at boot: `load-kvm [ARGS]` in the guest loads them,
#               the CPU vendor's module with ARGS (e.g. nested=1). The nested-virtualization tests
#               append the exitless binary under test and its libraries as one more archive.
#
# Why uncompressed: on a PVM host every guest kernel instruction is emulated, and gunzip of a 1 MB
# initramfs alone costs ~50 M emulated instructions (tens of seconds). Modules are decompressed here
# for the same reason.
#
# Packages are fetched with `apt-get download` (nothing is installed on the host) and unpacked with
# `dpkg-deb -x`. Downloads are kept in OUTDIR/debs and reused, so re-running is cheap.
set -euo pipefail

die() { echo "debian-guest.sh: error: $*" >&2; exit 1; }
log() { echo "debian-guest.sh: $*" >&2; }

for tool in apt-get apt-cache dpkg-deb cpio; do
    command -v "$tool" >/dev/null 2>&1 ||
        die "'$tool' is missing: this script needs a Debian/Ubuntu host with apt-get, apt-cache, dpkg-deb and cpio"
done

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
outdir="${1:-$repo_root/images/debian}"
mkdir -p "$outdir"
outdir="$(cd "$outdir" && pwd)"
debs="$outdir/debs"
work="$outdir/work"
mkdir -p "$debs"

# Modules the guest loads (names as in modules.dep, '-' and '_' equivalent); their dependencies are
# added from modules.dep. Modules built into the kernel or absent are skipped with a note.
wanted_modules=(
    virtio virtio_ring virtio_mmio virtio_pci virtio_pci_modern_dev virtio_pci_legacy_dev
    virtio_blk virtio_net virtio_console virtio_rng virtio_balloon
    vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
    evdev button
)

DEBS="$debs"
# shellcheck source=lib/debian.sh
. "$repo_root/tools/lib/debian.sh"

kpkg="$(deb_kernel_package)"
log "kernel package: $kpkg"
kdeb="$(deb_download "$kpkg")"
bdeb="$(deb_download busybox-static)"

rm -rf "$work"
mkdir -p "$work/kernel" "$work/busybox" "$work/root"
dpkg-deb -x "$kdeb" "$work/kernel" || die "dpkg-deb -x $kdeb failed"
dpkg-deb -x "$bdeb" "$work/busybox" || die "dpkg-deb -x $bdeb failed"

kimages=("$work"/kernel/boot/vmlinuz-*)
kimage="${kimages[0]}"
[ -f "$kimage" ] || die "no /boot/vmlinuz-* in $kdeb"
kver="${kimage##*/vmlinuz-}"
moddir="$work/kernel/lib/modules/$kver"
[ -d "$moddir/kernel" ] || die "no /lib/modules/$kver/kernel in $kdeb"
log "kernel version: $kver"

# The module closure, in load order, decompressed on the way into the initramfs (.ko.xz/.ko.zst)
# so that the guest spends no emulated time in a decompressor.
modout="$work/modules"
module_closure "$moddir" "$modout" "${wanted_modules[@]}"
load_order=("${MODULE_LOAD_ORDER[@]}")

# --- the root file system ---
root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,root,etc,lib/modules/"$kver"}
busybox_tree "$root" "$work/busybox/bin/busybox"

: >"$root/lib/modules/$kver/load-order"
for name in "${load_order[@]}"; do
    mv "$modout/$name.ko" "$root/lib/modules/$kver/$name.ko"
    echo "$name.ko" >>"$root/lib/modules/$kver/load-order"
done
log "modules (load order): ${load_order[*]:-none}"

cat >"$root/init" <<'EOF'
#!/bin/sh
# exitless guest init (busybox sh): mount the basics, load virtio/vsock modules, give a shell.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
# The first userspace line, as early as it can be (exitless bench boot times the boot to it), with
# the guest's own uptime.
echo "exitless-guest: init started at $(cut -d' ' -f1 /proc/uptime) s"
# Under `exitless bench boot` the boot ends here: the guest idles, so that the exit counters the
# bench reads next hold the boot's exits and nothing else's.
grep -qw exitless.bench=boot /proc/cmdline && exec sleep 2147483647
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mount -t tmpfs tmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
# The kernel gave init /dev/console from the initramfs; re-open it from devtmpfs in case it did not.
[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1
kver=$(uname -r)
if [ -f /lib/modules/$kver/load-order ]; then
    while read -r m; do
        insmod /lib/modules/$kver/$m 2>/dev/null || echo "exitless-guest: insmod $m failed"
    done </lib/modules/$kver/load-order
fi
# The ACPI power button (exitless ctl shutdown): the kernel's button driver turns it into a
# KEY_POWER input event (/dev/input/event0, through evdev), and busybox acpid runs
# /etc/acpi/PWRF/00000080 for it (a power-off).
# (acpid logs to /var/log/acpid.log, and dies once daemonized if it cannot open it.)
mkdir -p /var/log
acpid -c /etc/acpi 2>/dev/null || echo "exitless-guest: acpid did not start"
echo "exitless-guest: nproc=$(nproc) $(grep MemTotal /proc/meminfo | tr -s ' ')"
# A shell on the console. cttyhack finds the real console device (e.g. ttyS0) and makes it the
# controlling terminal, so job control and ^C work; the shell reads commands from the console even
# when nothing interactive is attached (it reads whatever arrives on the serial line).
while true; do
    setsid cttyhack sh -l || sh
    echo "exitless-guest: shell exited; restarting"
    sleep 1
done
EOF
chmod 755 "$root/init"
mkdir -p "$root/etc/acpi/PWRF"
cat >"$root/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
# The ACPI power button was pressed: a clean power-off (file systems synced first).
echo "exitless-guest: power button: powering off" >/dev/console
sync
poweroff -f
EOF
chmod 755 "$root/etc/acpi/PWRF/00000080"
cat >"$root/etc/profile" <<'EOF'
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PS1='exitless# '
EOF

# --- the archive ---
tmp_initrd="$outdir/initrd.img.tmp"
newc_archive "$root" >"$tmp_initrd"
mv "$tmp_initrd" "$outdir/initrd.img"

# --- the test variant: initrd.img plus programs busybox lacks, copied from this host with their
# libraries (a second archive; the kernel unpacks both in order): mkfs.ext4 (the guest makes its
# own file system) and socat (AF_VSOCK both ways). Left out, with a note, where the host lacks them.
tools=()
for prog in mke2fs e2fsck socat; do
    p="$(command -v "$prog" 2>/dev/null || true)"
    [ -n "$p" ] && tools+=("$(readlink -f "$p")") || log "note: $prog is not on this host: initrd-tools.img has none"
done
rm -rf "$work/tools"
mkdir -p "$work/tools/sbin" "$work/tools/etc"
if [ ${#tools[@]} -gt 0 ]; then
    copy_with_libs "$work/tools" "${tools[@]}"
    for t in "${tools[@]}"; do ln -sf "$t" "$work/tools/sbin/$(basename "$t")"; done
    [ -e "$work/tools/sbin/mke2fs" ] && ln -sf mke2fs "$work/tools/sbin/mkfs.ext4"
    [ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$work/tools/etc/"
fi
# ethtool (`ethtool -C`: the guest sets virtio-net's interrupt coalescing) from Debian's package,
# with libmnl from its own package; other libraries (libc) as ldd finds them on this host.
for pkg in ethtool libmnl0; do
    dpkg-deb -x "$(deb_download "$pkg")" "$work/tools" || die "dpkg-deb -x $pkg failed"
done
rm -rf "$work/tools/usr/share" "$work/tools/etc/network"
[ -x "$work/tools/sbin/ethtool" ] || die "the ethtool package has no /sbin/ethtool"
copy_libs "$work/tools" "$work/tools/sbin/ethtool"
{
    cat "$outdir/initrd.img"
    (cd "$work/tools" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0)
} >"$outdir/initrd-tools.img.tmp"
mv "$outdir/initrd-tools.img.tmp" "$outdir/initrd-tools.img"

# --- the nested variant: initrd-tools.img plus the KVM modules in /lib/modules/$kver/kvm (their own
# load order, not loaded by init) and /sbin/load-kvm, which loads them.
nested="$work/nested"
kvmdir="$nested/lib/modules/$kver/kvm"
module_closure "$moddir" "$kvmdir" irqbypass kvm kvm_amd kvm_intel
printf '%s\n' "${MODULE_LOAD_ORDER[@]}" >"$kvmdir/load-order"
log "KVM modules (load order): ${MODULE_LOAD_ORDER[*]}"
mkdir -p "$nested/sbin"
cat >"$nested/sbin/load-kvm" <<'LOADKVM'
#!/bin/sh
# load-kvm [ARGS...]: loads KVM's modules in order, the CPU vendor's (kvm_amd or kvm_intel) with
# ARGS (e.g. nested=1), the other vendor's not at all. The first failure ends it with its status.
d=/lib/modules/$(uname -r)/kvm
vendor=kvm_intel
grep -q AuthenticAMD /proc/cpuinfo && vendor=kvm_amd
while read -r m; do
    case "$m" in
    kvm_amd | kvm_intel) [ "$m" = "$vendor" ] || continue; insmod "$d/$m.ko" "$@" || exit ;;
    *) insmod "$d/$m.ko" || exit ;;
    esac
done <"$d/load-order"
LOADKVM
chmod 755 "$nested/sbin/load-kvm"
{
    cat "$outdir/initrd-tools.img"
    (cd "$nested" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0)
} >"$outdir/initrd-nested.img.tmp"
mv "$outdir/initrd-nested.img.tmp" "$outdir/initrd-nested.img"
cp "$kimage" "$outdir/vmlinuz"
rm -rf "$work"

log "wrote $outdir/vmlinuz ($(stat -c %s "$outdir/vmlinuz") bytes, kernel $kver)"
log "wrote $outdir/initrd.img ($(stat -c %s "$outdir/initrd.img") bytes, uncompressed newc cpio)"
log "wrote $outdir/initrd-tools.img ($(stat -c %s "$outdir/initrd-tools.img") bytes: initrd.img + ${tools[*]##*/} ethtool)"
log "wrote $outdir/initrd-nested.img ($(stat -c %s "$outdir/initrd-nested.img") bytes: initrd-tools.img + KVM modules)"
