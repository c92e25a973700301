#!/usr/bin/env bash
# Boots the same kernel, initramfs and command line under exitless and under
# `qemu-system-x86_64 -accel kvm` (same memory and CPUs), one after the other in the same run, and
# prints the time each took to print "Run /init as init process" (or that it never did).
#   tools/compare-boot.sh [KERNEL] [INITRD] [TIMEOUT_SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
kernel=${1:-images/debian/vmlinuz}
initrd=${2:-images/debian/initrd.img}
limit=${3:-1200}
mem=512M; cpus=2
command -v qemu-system-x86_64 >/dev/null || { echo "qemu-system-x86_64 missing: apt-get install qemu-system-x86" >&2; exit 1; }
[ -f "$kernel" ] && [ -f "$initrd" ] || { echo "missing $kernel or $initrd: run tools/debian-guest.sh" >&2; exit 1; }
cargo build --release -q
bin=target/release/exitless
out=$(mktemp -d)
# exitless's full command line (defaults + host extras), so QEMU gets exactly the same one.
cmdline=$($bin run --kernel "$kernel" --verbose-boot --print-cmdline)

watch_for_init() { # FILE ERRFILE PID START -> prints seconds or "never"
    local f=$1 err=$2 pid=$3 start=$4
    while kill -0 "$pid" 2>/dev/null; do
        if grep -aq "Run /init as init process" "$f"; then
            echo "$(( $(date +%s) - start ))"; return
        fi
        # QEMU pauses the VM (and never exits) when KVM's emulator fails.
        if grep -aqi "emulation failure\|internal error" "$err"; then
            echo "never (stopped: $(grep -ai -m1 'emulation failure\|internal error' "$err"))"; return
        fi
        sleep 1
    done
    grep -aq "Run /init as init process" "$f" && echo "$(( $(date +%s) - start ))" || echo never
}

echo "command line: $cmdline"
start=$(date +%s)
timeout "$limit" $bin run --kernel "$kernel" --initrd "$initrd" --mem $mem --cpus $cpus \
    --no-default-cmdline --cmdline "$cmdline" --stats-json "$out/exitless.json" \
    >"$out/exitless.log" 2>"$out/exitless.err" &
pid=$!
t_exitless=$(watch_for_init "$out/exitless.log" "$out/exitless.err" $pid "$start")
kill -INT $pid 2>/dev/null || true; wait $pid 2>/dev/null || true

start=$(date +%s)
timeout "$limit" qemu-system-x86_64 -accel kvm -M q35 -m $mem -smp $cpus -nographic -no-reboot \
    -kernel "$kernel" -initrd "$initrd" -append "$cmdline" </dev/null >"$out/qemu.log" 2>"$out/qemu.err" &
pid=$!
t_qemu=$(watch_for_init "$out/qemu.log" "$out/qemu.err" $pid "$start")
kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true

echo "exitless: Run /init after ${t_exitless} s"
grep -a "exits to userspace\|completed by exitless" "$out/exitless.err" || true
echo "qemu -accel kvm: Run /init after ${t_qemu} s"
grep -a -m3 "KVM internal error\|emulation failure\|error" "$out/qemu.err" || true
echo "logs in $out"
