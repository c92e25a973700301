#!/usr/bin/env bash
# The project's test command (the README's second command; CI runs exactly this).
#   tools/test.sh          formatting, lints, unit and integration tests, kit guests under KVM,
#                          the real-kernel tests (the Debian guest is built first if missing)
# Environment: EXITLESS_SKIP_LINUX=1 skips the slow real-kernel tests (they say so when skipped).
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }
if ! need cargo; then
    echo "tools/test.sh: cargo is missing: install Rust (https://rustup.rs) first" >&2
    exit 1
fi
# Packages the tests use: QEMU (the peer in side-by-side checks), busybox/cpio (the Debian guest's
# initramfs), e2fsprogs, iproute2. Installed when missing and we are root.
missing=()
need qemu-system-x86_64 || missing+=(qemu-system-x86)
need busybox || [ -e /bin/busybox ] || missing+=(busybox-static)
need cpio || missing+=(cpio)
need mkfs.ext4 || missing+=(e2fsprogs)
need ip || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && need apt-get; then
        echo "tools/test.sh: installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "tools/test.sh: missing packages: ${missing[*]} (apt-get install them)" >&2
        exit 1
    fi
fi

echo "== format and lints"
cargo fmt --check
(cd guests && cargo fmt --check)
cargo clippy --release --all-targets -- -D warnings

if [ "${EXITLESS_SKIP_LINUX:-0}" != 1 ] && [ ! -f images/debian/vmlinuz ]; then
    echo "== building the Debian guest (tools/debian-guest.sh)"
    tools/debian-guest.sh images/debian
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "== tests"
# Everything but the real-kernel tests, in parallel.
cargo test --release -- --test-threads=2 --skip linux_ 2>&1 | tee -a "$log"
# Real kernels one at a time: on a host that emulates guest kernel code, the guest's timer tick
# alone can take most of a core, and a second VM beside it starves both.
echo "== real-kernel tests (one at a time)"
cargo test --release linux_ -- --nocapture --test-threads=1 2>&1 | tee -a "$log"

# One closing line over every test binary (cargo prints one result line per binary).
awk '/^test result:/ {
        for (i = 1; i < NF; i++) {
            if ($(i + 1) ~ /^passed/) p += $i
            if ($(i + 1) ~ /^failed/) f += $i
            if ($(i + 1) ~ /^ignored/) s += $i
        }
    }
    END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
