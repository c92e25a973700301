#!/usr/bin/env bash
# debian-guest.sh [OUTDIR] — build exitless's default Linux guest from Debian packages.
#
# Produces, in OUTDIR (default: images/debian under the repository root):
#   vmlinuz     the bzImage of Debian's current cloud kernel (linux-image-cloud-amd64's dependency)
#   initrd.img  an UNCOMPRESSED newc cpio: busybox, the kernel's virtio/vsock modules (decompressed)
#               and an /init that loads them and gives a shell on the console.
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
)

apt_updated=0
# download PACKAGE: fetch PACKAGE's .deb into $debs unless already there; `apt-get update` once if
# the first attempt fails (stale or empty package lists).
download() {
    local pkg="$1"
    if compgen -G "$debs/${pkg}_*.deb" >/dev/null; then
        log "have $pkg"
        return
    fi
    log "downloading $pkg"
    if ! (cd "$debs" && apt-get download "$pkg"); then
        if [ "$apt_updated" = 0 ]; then
            log "apt-get download failed; running apt-get update and retrying"
            apt-get update || die "apt-get update failed (run as root, or run it yourself first)"
            apt_updated=1
            (cd "$debs" && apt-get download "$pkg") || die "apt-get download $pkg failed"
        else
            die "apt-get download $pkg failed"
        fi
    fi
}

# The meta package's current versioned kernel package, e.g. linux-image-6.1.0-56-cloud-amd64.
resolve_kernel_pkg() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}
kpkg="$(resolve_kernel_pkg || true)"
if [ -z "$kpkg" ]; then
    log "apt-cache does not know linux-image-cloud-amd64; running apt-get update"
    apt-get update || die "apt-get update failed (run as root, or run it yourself first)"
    apt_updated=1
    kpkg="$(resolve_kernel_pkg || true)"
    [ -n "$kpkg" ] || die "cannot resolve linux-image-cloud-amd64's kernel package (is this Debian with main enabled?)"
fi
log "kernel package: $kpkg"

download "$kpkg"
download busybox-static

kdebs=("$debs/${kpkg}"_*.deb)
bdebs=("$debs"/busybox-static_*.deb)
kdeb="${kdebs[-1]}"
bdeb="${bdebs[-1]}"
if [ ! -f "$kdeb" ] || [ ! -f "$bdeb" ]; then
    die "downloaded packages not found in $debs"
fi

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

# --- module closure, in load order (dependencies first) ---
# Debian's packages do not ship modules.dep (depmod makes it at install time), so dependencies are
# read from each module's own .modinfo `depends=` field. Modules are decompressed on the way into
# the initramfs (.ko.xz/.ko.zst/.ko.gz) so that the guest spends no emulated time in a decompressor.
modout="$work/modules"
mkdir -p "$modout"
declare -A path_of=() builtin=() seen=()
while IFS= read -r mod; do
    name="${mod##*/}"
    name="${name%%.ko*}"
    path_of[${name//-/_}]="$mod"
done < <(find "$moddir/kernel" -name '*.ko*')
if [ -f "$moddir/modules.builtin" ]; then
    while IFS= read -r mod; do
        name="${mod##*/}"
        name="${name%%.ko*}"
        builtin[${name//-/_}]=1
    done <"$moddir/modules.builtin"
fi

# decompress SRC DST: a module file in any of the kernel's formats, uncompressed.
decompress() {
    case "$1" in
    *.ko) cp "$1" "$2" ;;
    *.ko.xz) xz -dc "$1" >"$2" || die "xz failed on $1 (install xz-utils)" ;;
    *.ko.zst) zstd -dcq "$1" >"$2" || die "zstd failed on $1 (install zstd)" ;;
    *.ko.gz) gzip -dc "$1" >"$2" || die "gzip failed on $1" ;;
    *) die "unknown module format: $1" ;;
    esac
}

load_order=()
visit() {
    local name="${1//-/_}" dep deps
    [ -z "${seen[$name]:-}" ] || return 0
    seen[$name]=1
    if [ -z "${path_of[$name]:-}" ]; then
        if [ -n "${builtin[$name]:-}" ]; then
            log "module $name is built into the kernel"
        else
            log "warning: module $name not found in $kver"
        fi
        return 0
    fi
    decompress "${path_of[$name]}" "$modout/$name.ko"
    deps="$(tr '\0' '\n' <"$modout/$name.ko" | sed -n 's/^depends=//p')"
    for dep in ${deps//,/ }; do
        visit "$dep"
    done
    load_order+=("$name")
}
for m in "${wanted_modules[@]}"; do
    visit "$m"
done

# --- the root file system ---
root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,root,etc,lib/modules/"$kver"}
cp "$work/busybox/bin/busybox" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list-full 2>/dev/null || true); do
    [ "$applet" = bin/busybox ] && continue
    mkdir -p "$root/$(dirname "$applet")"
    ln -sf /bin/busybox "$root/$applet"
done
# --list-full needs to run busybox on the build host; make sure the essentials exist regardless.
for applet in sh mount insmod cat echo setsid cttyhack nproc poweroff; do
    [ -e "$root/bin/$applet" ] || [ -e "$root/sbin/$applet" ] || ln -sf /bin/busybox "$root/bin/$applet"
done

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
cat >"$root/etc/profile" <<'EOF'
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PS1='exitless# '
EOF

# --- the archive ---
# Main archive from the tree, then a second, hand-written newc archive holding the /dev/console
# character device (5,1), which an unprivileged build cannot mknod. The kernel unpacks concatenated
# archives in order, and opens /dev/console for init before init runs.
newc_entry() { # name mode major minor: one newc header + name, padded to 4 bytes
    local name="$1" mode="$2" rmaj="$3" rmin="$4" namesize hdr pad
    namesize=$((${#name} + 1))
    hdr=$(printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        0 "$mode" 0 0 1 0 0 0 0 "$rmaj" "$rmin" "$namesize" 0)
    printf '%s%s\0' "$hdr" "$name"
    pad=$(((4 - (110 + namesize) % 4) % 4))
    head -c "$pad" /dev/zero
}
tmp_initrd="$outdir/initrd.img.tmp"
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$tmp_initrd"
{
    newc_entry dev/console $((0020600)) 5 1
    newc_entry TRAILER!!! 0 0 0
} >>"$tmp_initrd"
mv "$tmp_initrd" "$outdir/initrd.img"
cp "$kimage" "$outdir/vmlinuz"
rm -rf "$work"

log "wrote $outdir/vmlinuz ($(stat -c %s "$outdir/vmlinuz") bytes, kernel $kver)"
log "wrote $outdir/initrd.img ($(stat -c %s "$outdir/initrd.img") bytes, uncompressed newc cpio)"
