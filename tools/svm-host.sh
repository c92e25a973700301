#!/usr/bin/env bash
# svm-host.sh [OPTIONS] [--] COMMAND [ARGS...] — run one command inside an emulated SVM host.
#
# The emulated host ("L1") is Debian's cloud kernel booted by `qemu-system-x86_64 -accel
# tcg,thread=multi -cpu max`, which emulates an AMD CPU with SVM and nested paging; its initramfs
# loads irqbypass, kvm and `kvm-amd nested=1`, so L1 has a hardware-style /dev/kvm (not PVM). That
# lets a machine without VMX/SVM (or with only PVM) run exitless's real guests with userspace.
# Timings inside are TCG's: use it for function, exit counts and ratios between VMMs measured in
# the same run, never for absolute speed.
#
# Inside L1 the command runs as root (sh -c, busybox), in the same working directory as here, with:
#   - exitless (target/release/exitless, built first) on PATH, at the same absolute path as here;
#   - the Debian guest of tools/debian-guest.sh at images/debian/ (same absolute path), built
#     first if missing; $EXITLESS_DEBIAN_GUEST names that directory;
#   - qemu-system-x86_64 with its firmware (for side-by-side runs), iproute2's `ip` (network
#     namespaces), mkfs.ext4/e2fsck/debugfs, busybox for the rest; tun, veth, vhost modules loaded;
#   - every --add PATH at its absolute path, and this environment's EXITLESS_* and RUST_* variables.
# Its stdout and stderr come back on this script's stdout and stderr as they are written, and this
# script exits with its status: 124 when --timeout ends it, 125 when L1 failed (its console log
# is printed on stderr; also when its kernel panicked and hung instead of rebooting), 126 when
# L1's kernel hung: a soft lockup of --hang SECS or more (TCG
# emulation faults have stuck an L1 CPU for good; the first lockup report, with its call trace,
# is printed on stderr).
#
# Options:
#   --add PATH        copy PATH (file or directory; ELF files with their libraries) into L1
#   --drive FILE      give L1 the host file FILE as a virtio disk (/dev/vda, /dev/vdb, ... in
#                     order; writable, host-cached): L1's only storage besides RAM, e.g. for
#                     swap (`mkswap /dev/vdb; swapon /dev/vdb`) or a guest's disk image
#   --timeout SECS    end L1 after SECS (default 3600)
#   --hang SECS       end L1 when its console reports a CPU stuck for SECS or more (default 180)
#   --mem SIZE        L1's memory (default 3G)    --cpus N   L1's CPUs (default 2)
#   --console FILE    keep L1's console log in FILE
#   --no-build        use target/release/exitless as it is
#
# The L1 base image (kernel, modules, busybox, QEMU, tools) is cached in images/svm-host/ and
# rebuilt when its inputs change (this script, the kernel package, the host programs copied).
# Needs: qemu-system-x86_64 (QEMU 10 recommended: bookworm's 7.2 froze L1 after a few nested
# boots; `apt-get install -t bookworm-backports qemu-system-x86`), apt-get/dpkg-deb/cpio.
set -euo pipefail

die() { echo "svm-host.sh: error: $*" >&2; exit 125; }
log() { [ "${quiet:-0}" = 1 ] || echo "svm-host.sh: $*" >&2; }

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
timeout_s=3600 hang_s=180 mem=3G cpus=2 console_keep="" build=1 quiet=0
adds=()
drives=()
while [ $# -gt 0 ]; do
    case "$1" in
    --add) adds+=("$(readlink -f "$2")"); shift 2 ;;
    --drive) [ -f "$2" ] || die "--drive $2: no such file"; drives+=("$(readlink -f "$2")"); shift 2 ;;
    --timeout) timeout_s="$2"; shift 2 ;;
    --hang) hang_s="$2"; shift 2 ;;
    --mem) mem="$2"; shift 2 ;;
    --cpus) cpus="$2"; shift 2 ;;
    --console) console_keep="$2"; shift 2 ;;
    --no-build) build=0; shift ;;
    --quiet) quiet=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see the head of $0)" ;;
    *) break ;;
    esac
done
[ $# -gt 0 ] || die "no command given: tools/svm-host.sh [OPTIONS] COMMAND [ARGS...]"

qemu="$(command -v qemu-system-x86_64 || true)"
[ -n "$qemu" ] || die "qemu-system-x86_64 is missing: apt-get install qemu-system-x86 (QEMU 10 from bookworm-backports)"
for tool in apt-get dpkg-deb cpio ldd; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' is missing (a Debian host is needed to build L1)"
done

cache="$repo_root/images/svm-host"
DEBS="$repo_root/images/debian/debs"
mkdir -p "$cache" "$DEBS"
# shellcheck source=lib/debian.sh
. "$repo_root/tools/lib/debian.sh"

# --- inputs that live outside the cache -----------------------------------------------------
if [ "$build" = 1 ]; then
    log "building exitless (cargo build --release)"
    (cd "$repo_root" && cargo build --release -q) || die "cargo build --release failed"
fi
exitless_bin="$repo_root/target/release/exitless"
[ -x "$exitless_bin" ] || die "$exitless_bin is missing (cargo build --release)"
guest_dir="$repo_root/images/debian"
if [ ! -f "$guest_dir/vmlinuz" ] || [ ! -f "$guest_dir/initrd-tools.img" ] ||
    [ ! -f "$guest_dir/initrd-nested.img" ]; then
    log "building the Debian guest (tools/debian-guest.sh)"
    "$repo_root/tools/debian-guest.sh" "$guest_dir" >&2 || die "tools/debian-guest.sh failed"
fi

# --- the L1 base image (cached) -------------------------------------------------------------
# Host programs copied into L1 with their libraries.
host_progs=("$qemu")
for prog in ip mke2fs e2fsck debugfs; do
    p="$(command -v "$prog" 2>/dev/null || true)"
    [ -n "$p" ] && host_progs+=("$(readlink -f "$p")") || log "note: $prog is not on this host, L1 has none"
done
qemu_firmware=(/usr/share/qemu/{bios-microvm.bin,qboot.rom,linuxboot.bin,linuxboot_dma.bin,kvmvapic.bin,pvh.bin,multiboot_dma.bin,bios-256k.bin,bios.bin,efi-virtio.rom} /usr/share/seabios/{bios-256k.bin,bios-microvm.bin,bios.bin})
kpkg="$(deb_kernel_package)"
kdeb="$(deb_download "$kpkg")"
# The dynamic busybox, not busybox-static: the static build's shell runs its own applets before
# PATH (FEATURE_SH_STANDALONE), so `ip netns` in a command would never reach iproute2's ip.
bdeb="$(deb_download busybox)"
stamp="$(
    sha256sum "$0" "$repo_root/tools/lib/debian.sh" | cut -d' ' -f1
    echo "$kdeb $bdeb"
    stat -L -c '%n %s %Y' "${host_progs[@]}"
)"
if [ ! -f "$cache/base.cpio" ] || [ "$(cat "$cache/base.stamp" 2>/dev/null)" != "$stamp" ]; then
    log "building the L1 base image in $cache"
    work="$cache/work"
    rm -rf "$work"
    mkdir -p "$work/kernel" "$work/busybox" "$work/root"
    dpkg-deb -x "$kdeb" "$work/kernel" || die "dpkg-deb -x $kdeb failed"
    dpkg-deb -x "$bdeb" "$work/busybox" || die "dpkg-deb -x $bdeb failed"
    kimages=("$work"/kernel/boot/vmlinuz-*)
    kver="${kimages[0]##*/vmlinuz-}"
    root="$work/root"
    mkdir -p "$root"/{proc,sys,dev,tmp,run,root,etc,var,mnt,lib/modules/"$kver"}
    busybox_tree "$root" "$work/busybox/bin/busybox"
    copy_libs "$root" "$work/busybox/bin/busybox"
    module_closure "$work/kernel/lib/modules/$kver" "$root/lib/modules/$kver" \
        irqbypass kvm kvm_amd tun veth vhost_net vhost_vsock loop virtio_pci virtio_blk
    printf '%s\n' "${MODULE_LOAD_ORDER[@]}" >"$root/lib/modules/$kver/load-order"
    # Programs shadowed by busybox applets of the same name: the real ones come first on PATH.
    copy_with_libs "$root" "${host_progs[@]}"
    for f in "${qemu_firmware[@]}"; do
        if [ -e "$f" ]; then copy_with_libs "$root" "$f"; fi
    done
    [ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"
    mkdir -p "$root/opt/host/bin"
    for p in "${host_progs[@]}"; do ln -sf "$p" "$root/opt/host/bin/$(basename "$p")"; done
    ln -sf mke2fs "$root/opt/host/bin/mkfs.ext4"
    cat >"$root/init" <<'EOF'
#!/bin/sh
# The emulated SVM host's init: mount, load KVM (nested) and the network modules, run the command
# of /svm-host/command with stdout on ttyS1, stderr on ttyS2, its status on ttyS3, power off.
export PATH=/opt/host/bin:/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /sys/fs/cgroup
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
# tracefs: the kvm:kvm_exit tracepoint of `exitless run --kernel-exit-reasons`.
mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null
kver=$(uname -r)
while read -r m; do
    args=
    [ "$m" = kvm_amd ] && args="nested=1"
    insmod /lib/modules/$kver/$m.ko $args || echo "svm-host: insmod $m failed" >/dev/ttyS0
done </lib/modules/$kver/load-order
ip link set lo up
for t in ttyS1 ttyS2 ttyS3; do stty -F /dev/$t raw -echo -onlcr 2>/dev/null; done
[ -c /dev/kvm ] || echo "svm-host: no /dev/kvm in L1" >/dev/ttyS2
. /svm-host/env
sh -c ". /svm-host/command" </dev/null >/dev/ttyS1 2>/dev/ttyS2
echo "status $?" >/dev/ttyS3
sync
poweroff -f
EOF
    chmod 755 "$root/init"
    newc_archive "$root" >"$cache/base.cpio.tmp"
    cp "${kimages[0]}" "$cache/vmlinuz"
    mv "$cache/base.cpio.tmp" "$cache/base.cpio"
    echo "$stamp" >"$cache/base.stamp"
    rm -rf "$work"
    log "L1 base image: $(($(stat -c %s "$cache/base.cpio") >> 20)) MiB, kernel $kver"
fi

# --- this run's payload: exitless, the guest, --add paths, the command --------------------------
run="$(mktemp -d /tmp/svm-host.XXXXXX)"
qemu_pid=""
cleanup() {
    [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null
    [ -n "${cat_pids:-}" ] && kill $cat_pids 2>/dev/null
    rm -rf "$run"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
pay="$run/payload"
mkdir -p "$pay/svm-host"
# Debug information is dropped on the way in (the binaries shrink ~5x; symbols stay).
copy_stripped() {
    copy_with_libs "$pay" "$1"
    if head -c 4 "$1" | grep -q ELF; then
        objcopy --strip-debug "$pay$1" 2>/dev/null || true
    fi
}
copy_stripped "$exitless_bin"
for f in vmlinuz initrd.img initrd-tools.img initrd-nested.img; do
    copy_with_libs "$pay" "$guest_dir/$f"
done
for a in "${adds[@]}"; do
    if [ -d "$a" ]; then
        mkdir -p "$pay$a"
        cp -a "$a/." "$pay$a/"
    else
        copy_stripped "$a"
    fi
done
# Single-quoted words: sh reads them back exactly.
quote() { printf "'%s' " "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }
{
    printf 'cd %s || exit 125\n' "$(quote "$PWD")"
    for a in "$@"; do quote "$a"; done
    echo
} >"$pay/svm-host/command"
{
    printf 'export PATH=%s\n' "$(quote "$(dirname "$exitless_bin"):/opt/host/bin:/bin:/sbin:/usr/bin:/usr/sbin")"
    printf 'export EXITLESS_DEBIAN_GUEST=%s\n' "$(quote "$guest_dir")"
    echo "export EXITLESS_IN_SVM_HOST=1 HOME=/root"
    while IFS='=' read -r -d '' k v; do
        case "$k" in EXITLESS_* | RUST_*) printf 'export %s=%s\n' "$k" "$(quote "$v")" ;; esac
    done < <(env -0)
} >"$pay/svm-host/env"
(cd "$pay" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$run/payload.cpio"
cat "$cache/base.cpio" "$run/payload.cpio" >"$run/initrd.cpio"
rm -rf "$pay" "$run/payload.cpio"

# --- boot L1 ----------------------------------------------------------------------------------
drive_args=()
for d in "${drives[@]}"; do
    drive_args+=(-drive "file=$d,format=raw,if=virtio,cache=writeback")
done
mkfifo "$run/out" "$run/err"
cat "$run/out" &
cat_pids="$!"
cat "$run/err" >&2 &
cat_pids="$cat_pids $!"
console="$run/console.log"
log "booting the emulated SVM host ($(($(stat -c %s "$run/initrd.cpio") >> 20)) MiB initramfs, $cpus CPUs, $mem)"
"$qemu" -accel tcg,thread=multi -cpu max -smp "$cpus" -m "$mem" \
    -nodefaults -no-reboot -display none -vga none \
    -kernel "$cache/vmlinuz" -initrd "$run/initrd.cpio" \
    -append "console=ttyS0 quiet loglevel=5 panic=-1 rdinit=/init mitigations=off tsc=reliable" \
    -serial "file:$console" -serial "file:$run/out" -serial "file:$run/err" \
    -serial "file:$run/status" "${drive_args[@]}" </dev/null >"$run/qemu.log" 2>&1 &
qemu_pid=$!
# The longest "soft lockup - CPU#N stuck for Ss" L1's console has reported (0 for none).
longest_lockup() {
    sed -n 's/.*soft lockup - CPU#[0-9]* stuck for \([0-9]*\)s.*/\1/p' "$console" 2>/dev/null |
        sort -n | tail -n 1 | grep . || echo 0
}
stop_l1() {
    kill "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
    qemu_pid=""
    wait $cat_pids 2>/dev/null || true
    cat_pids=""
    # An `if`, not `&&`: as a function's last command a false test would be its status, and
    # `set -e` would end the script before it says why L1 stopped.
    if [ -n "$console_keep" ]; then cp "$console" "$console_keep"; fi
}
deadline=$(($(date +%s) + timeout_s))
next_hang_check=0
while kill -0 "$qemu_pid" 2>/dev/null; do
    now=$(date +%s)
    if [ "$now" -ge "$deadline" ]; then
        stop_l1
        echo "svm-host.sh: the command did not end within $timeout_s s; L1's console ends with:" >&2
        tail -n 20 "$console" >&2
        exit 124
    fi
    if [ "$now" -ge "$next_hang_check" ]; then
        next_hang_check=$((now + 10))
        if [ "$(longest_lockup)" -ge "$hang_s" ]; then
            stop_l1
            echo "svm-host.sh: L1's kernel hung (a CPU stuck for $hang_s s or more); its first lockup report:" >&2
            grep -m 1 -A 45 'soft lockup - CPU#' "$console" >&2
            exit 126
        fi
        # panic=-1 reboots at once (and -no-reboot ends QEMU), unless the panic itself hangs.
        if grep -q 'Kernel panic - not syncing' "$console" 2>/dev/null; then
            panicked_at=${panicked_at:-$now}
            if [ $((now - panicked_at)) -ge 30 ]; then
                stop_l1
                echo "svm-host.sh: L1's kernel panicked and did not reboot; its console:" >&2
                tail -n 60 "$console" >&2
                exit 125
            fi
        fi
    fi
    sleep 0.5
done
stop_l1
status="$(sed -n 's/^status \([0-9]*\).*/\1/p' "$run/status" 2>/dev/null | tail -n 1)"
if [ -z "$status" ]; then
    echo "svm-host.sh: L1 ended without the command's status; QEMU said:" >&2
    cat "$run/qemu.log" >&2
    echo "svm-host.sh: L1's console:" >&2
    tail -n 60 "$console" >&2
    exit 125
fi
exit "$status"
