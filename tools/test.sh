#!/usr/bin/env bash
# The project's test command (the README's second command; CI runs exactly this).
#   tools/test.sh   formatting and lints; unit and integration tests on this host; then the tests
#                   that need a real guest's userspace (tests/debian_*.rs) with the kit-guest suite
#                   beside them: on this host when its KVM runs guest userspace (VMX/SVM), else
#                   inside the emulated SVM host (tools/svm-host.sh), where they run on a
#                   hardware-style KVM.
# A test that cannot run here says why in an `exitless-skip:` line (tests/common::skip); the
# closing line counts those as skipped, never as passed, and lists the reasons.
# Environment:
#   EXITLESS_FAIL_ON_SKIP=1   any skip fails the run (CI sets it: everything must run there)
#   EXITLESS_PVM_STOCK_BOOT=1 also run the opt-in stock-kernel boot on this host (20-25 minutes
#                             on a PVM host; the same kernel is covered in the emulated host)
#   EXITLESS_NO_SVM_HOST=1    do not use the emulated SVM host (its tests then count as skipped)
#   EXITLESS_NO_FUZZ=1        skip the brief fuzzing run (counted as skipped)
#   EXITLESS_FUZZ_SECONDS=N   seconds per fuzz target in that run (default 10)
set -uo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }
die() { echo "tools/test.sh: $*" >&2; exit 1; }
need cargo || die "cargo is missing: install Rust (https://rustup.rs) first"

# --- packages ---------------------------------------------------------------------------------
# QEMU (the peer in side-by-side checks, and the emulator of the SVM host: version 10, since
# bookworm's 7.2 froze the emulated host after a few nested boots), busybox/cpio (initramfs
# images), e2fsprogs, socat (the test guest's tools, and tools/api-fuzz.sh's TCP bridge), iproute2
# and ping, binutils (objcopy), python3 with venv (tools/api-fuzz.sh's schemathesis).
qemu_major() { qemu-system-x86_64 --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p'; }
missing=()
need busybox || [ -e /bin/busybox ] || missing+=(busybox-static)
need cpio || missing+=(cpio)
need mkfs.ext4 || missing+=(e2fsprogs)
need socat || missing+=(socat)
need ip || missing+=(iproute2)
need ping || missing+=(iputils-ping)
need objcopy || missing+=(binutils)
need xz || missing+=(xz-utils)
need python3 || missing+=(python3)
python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
old_qemu=0
qemu_note=""
if ! [ "$(qemu_major)" -ge 10 ] 2>/dev/null; then
    old_qemu=1
    qemu_note="qemu-system-x86 (10 or later)"
fi
if [ ${#missing[@]} -gt 0 ] || [ "$old_qemu" = 1 ]; then
    [ "$(id -u)" = 0 ] && need apt-get ||
        die "missing: ${missing[*]} $qemu_note (apt-get install them)"
    export DEBIAN_FRONTEND=noninteractive
    if [ "$old_qemu" = 1 ] && grep -qs 'bookworm' /etc/os-release &&
        ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d; then
        echo "tools/test.sh: adding Debian's bookworm-backports suite (QEMU 10)"
        printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            >/etc/apt/sources.list.d/exitless-backports.sources
    fi
    echo "tools/test.sh: installing ${missing[*]} $qemu_note"
    apt-get update -qq || die "apt-get update failed"
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get install -y -qq "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
    fi
    if [ "$old_qemu" = 1 ]; then
        apt-get install -y -qq -t bookworm-backports qemu-system-x86 >/dev/null 2>&1 ||
            apt-get install -y -qq qemu-system-x86 >/dev/null || die "apt-get install qemu-system-x86 failed"
    fi
fi
echo "tools/test.sh: $(qemu-system-x86_64 --version | head -n 1)"
# The pinned schemathesis of tools/api-fuzz.sh (tests/api_schema_fuzz.rs), in a venv outside the
# repository: without it that test skips, which CI (EXITLESS_FAIL_ON_SKIP=1) does not allow.
if ! tools/api-fuzz.sh --install-only; then
    if [ "${CI:-}" = true ] || [ "${EXITLESS_FAIL_ON_SKIP:-0}" = 1 ]; then
        die "cannot install schemathesis (tools/api-fuzz.sh --install-only): tests/api_schema_fuzz.rs needs it"
    fi
    echo "tools/test.sh: schemathesis cannot be installed: tests/api_schema_fuzz.rs will skip"
fi

echo "== format and lints"
cargo fmt --check || exit 1
(cd guests && cargo fmt --check) || exit 1
cargo clippy --release --all-targets -- -D warnings || exit 1

if [ ! -f images/debian/vmlinuz ] || [ ! -f images/debian/initrd-tools.img ]; then
    echo "== building the Debian guest (tools/debian-guest.sh)"
    tools/debian-guest.sh images/debian || die "tools/debian-guest.sh failed"
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
failed=0
stage() { # NAME COMMAND...: runs one stage, its output into the log; a failure is remembered
    echo "== $1"
    shift
    "$@" 2>&1 | tee -a "$log"
    [ "${PIPESTATUS[0]}" = 0 ] || failed=1
}

cargo build --release -q || exit 1
echo "tools/test.sh: $(target/release/exitless host 2>&1 | head -n 1)"
in_svm_host=0
target/release/exitless host 2>&1 | grep -q "hardware-assisted" || in_svm_host=1

# Everything but the real kernels, in parallel; the real-guest suite here only when this KVM runs
# guest userspace.
skip_here=(--skip linux_)
[ "$in_svm_host" = 1 ] && skip_here+=(--skip debian_)
stage "tests on this host" cargo test --release -- --test-threads=2 "${skip_here[@]}"
# A brief fuzzing run (tools/fuzz.sh, 10 s per target; the build takes a few minutes the first
# time, into target/fuzz): counted as one test, skipped with the reason where nightly or
# cargo-fuzz is missing (or EXITLESS_NO_FUZZ=1).
fuzz_stage() {
    local why=""
    if [ "${EXITLESS_NO_FUZZ:-0}" = 1 ]; then
        why="EXITLESS_NO_FUZZ=1"
    elif ! cargo +nightly --version >/dev/null 2>&1; then
        why="no nightly toolchain (rustup toolchain install nightly)"
    elif ! cargo +nightly fuzz --help >/dev/null 2>&1 &&
        ! { echo "tools/test.sh: installing cargo-fuzz (cargo install cargo-fuzz --locked)" &&
            cargo install -q cargo-fuzz --locked; }; then
        why="cargo-fuzz is not installed and cargo install cargo-fuzz failed"
    fi
    if [ -n "$why" ]; then
        echo "exitless-skip: fuzz: $why"
        echo "test result: ok. 1 passed; 0 failed; 0 ignored (fuzz, skipped)"
        return 0
    fi
    if CARGO_TARGET_DIR="$PWD/target/fuzz" tools/fuzz.sh "${EXITLESS_FUZZ_SECONDS:-10}"; then
        echo "test result: ok. 1 passed; 0 failed; 0 ignored (fuzz)"
    else
        echo "test result: FAILED. 0 passed; 1 failed; 0 ignored (fuzz)"
        return 1
    fi
}
stage "fuzzing (tools/fuzz.sh, briefly)" fuzz_stage
# Real kernels one at a time: on a host that emulates guest kernel code, the guest's timer tick
# alone can take most of a core, and a second VM beside it starves both.
linux_args=(--test-threads=1)
[ "${EXITLESS_PVM_STOCK_BOOT:-0}" = 1 ] && linux_args+=(--include-ignored)
# `linux_` is a substring filter: a real-guest test whose name holds it runs in the emulated host,
# not here (where it would only print a skip).
[ "$in_svm_host" = 1 ] && linux_args+=(--skip debian_)
stage "real-kernel tests on this host (one at a time)" cargo test --release linux_ -- "${linux_args[@]}"

# The loop L1 runs (busybox sh) over the test binaries. A binary that fails runs once more: the
# emulated host's TCG now and then wrecks a guest (a triple fault in a Debian guest, a few times
# in some CI runs, at random points; never reproduced by rerunning the test). When that second
# run fails too and its output shows such a wrecked guest (a triple fault, or the nested bench's
# L2 exitless ending under it), this L1 is given up (status 99): twice in CI runs the L1 that had
# wrecked two guests in a row soon died itself (a kernel stack overflow in `error_entry`), while
# the fresh L1 started for the binaries left passed them on their first run. The binary runs
# again there (see svm_host_stage). Any other second failure fails the stage.
# A failing run's result line is renamed when another run follows (here or in the fresh L1), so
# that only the last run counts; a binary that passes on a rerun is listed as flaky
# (`exitless-flaky:`). Each run has 20 minutes (the longest binary takes a few): an L1 that stops working without dying (seen once:
# idle, the test waiting for ever) costs that run, not the whole stage.
# shellcheck disable=SC2016
l1_loop='st=0
per_run=1200
for t in "$@"; do
    n=${t##*/}
    echo "== $n"
    timeout "$per_run" "$t" --test-threads=1 2>&1 | sed "s/^test result: FAILED/first run of $n: FAILED/" | tee /tmp/first-run
    grep -q " passed;" /tmp/first-run || echo "tools/test.sh: $n gave no result (ended by its $per_run s limit, or died)"
    if ! grep -q "^test result: ok" /tmp/first-run; then
        echo "tools/test.sh: $n failed; run 2"
        timeout "$per_run" "$t" --test-threads=1 > /tmp/rerun 2>&1
        if grep -q "^test result: ok" /tmp/rerun; then
            cat /tmp/rerun
            echo "exitless-flaky: $n (failed, then passed on run 2)"
        elif grep -q -e triple-faulted -e "the L2 guest.s exitless ended" /tmp/rerun; then
            sed "s/^test result: FAILED/run 2 of $n: FAILED/" /tmp/rerun
            echo "tools/test.sh: $n wrecked an L2 guest in two runs: this L1 is given up, the binaries left run in a fresh one"
            echo "exitless-flaky: $n (wrecked L2 guests in two runs in one L1, then ran in a fresh L1)"
            exit 99
        else
            cat /tmp/rerun
            echo "exitless-l1-failed: $n"
            st=1
        fi
    fi
    echo "exitless-l1-done: $t"
    # The files in L1 live in its RAM (rootfs, ~1.4 GiB): what is left after each binary.
    free -m | sed -n "2s/^Mem: */l1-memory (MiB total used free shared cache available): /p"
done
exit $st'

# Runs the test binaries in "${bins[@]}" inside the emulated SVM host, one test at a time. When
# the loop gives an L1 up (99: two wrecked L2 guests in a row, see l1_loop) or L1's kernel hangs
# (svm-host.sh exits 126 after printing the lockup report: TCG's emulation has stuck an L1 CPU
# for good, independent of the test) or dies (125: L1 ended without the command's
# status, e.g. the kernel panic "corrupted stack end detected inside scheduler": TCG delivers an
# interrupt to L1 right after VMRUN, seen in nested runs and, more often, under the vIOMMU bench's
# guests), the binaries that had not finished run again in a fresh L1, up to four more times
# (a CI run saw two deaths, one silent, in a row); a fifth hang or death, a timeout or a failing
# test fails the stage, also when it failed in an L1 given up later.
svm_host_stage() {
    local todo=("${bins[@]}") attempt st out adds b failed_before=0
    for attempt in 1 2 3 4 5; do
        adds=()
        for b in "${todo[@]}"; do adds+=(--add "$b"); done
        out=$(mktemp)
        tools/svm-host.sh --no-build --timeout 2400 "${adds[@]}" -- \
            sh -c "$l1_loop" sh "${todo[@]}" 2>&1 | tee "$out"
        st=${PIPESTATUS[0]}
        grep -q "exitless-l1-failed: " "$out" && failed_before=1
        if { [ "$st" = 125 ] || [ "$st" = 126 ] || [ "$st" = 99 ]; } && [ "$attempt" -lt 5 ]; then
            mapfile -t todo < <(for b in "${todo[@]}"; do
                grep -qF "exitless-l1-done: $b" "$out" || echo "$b"
            done)
            rm -f "$out"
            echo "tools/test.sh: L1's kernel hung or died, or wrecked two guests in a row (report above); the ${#todo[@]} test binaries left run again in a fresh L1"
            continue
        fi
        rm -f "$out"
        [ "$st" = 0 ] && [ "$failed_before" = 1 ] && st=1
        return "$st"
    done
}

if [ "$in_svm_host" = 1 ]; then
    # The test binaries of the real-guest suite, of the kit guests (whose hardware-style
    # paths this host cannot take) and of snapshots (MSRs and nested state of a guest given
    # SVM, ~45 s there), run inside the emulated SVM host one test at a time.
    mapfile -t bins < <(cargo test --release --no-run --message-format=json 2>/dev/null |
        sed -n 's/.*"executable":"\([^"]*\/\(debian_[a-z_]*\|kit_guests\|snapshot\)-[0-9a-f]*\)".*/\1/p' | sort -u)
    if [ ${#bins[@]} -eq 0 ]; then
        echo "tools/test.sh: found no test binaries for the emulated SVM host" | tee -a "$log"
        failed=1
    elif [ "${EXITLESS_NO_SVM_HOST:-0}" = 1 ]; then
        for b in "${bins[@]}"; do
            echo "exitless-skip: ${b##*/}: EXITLESS_NO_SVM_HOST=1 (not run in the emulated SVM host)"
        done | tee -a "$log"
    else
        stage "real guests in the emulated SVM host (tools/svm-host.sh)" svm_host_stage
    fi
fi

# One closing line over every test binary (cargo prints one result line per binary); a skipped
# test also passed in libtest's eyes, so it is moved from passed to skipped.
mapfile -t skips < <(grep -ao 'exitless-skip: .*' "$log" | sed 's/^exitless-skip: //' | sort -u)
awk -v skips="${#skips[@]}" '/^test result:/ {
        for (i = 1; i < NF; i++) {
            if ($(i + 1) ~ /^passed/) p += $i
            if ($(i + 1) ~ /^failed/) f += $i
            if ($(i + 1) ~ /^ignored/) g += $i
        }
    }
    END { printf "tests: %d passed, %d failed, %d skipped, %d ignored (opt-in)\n", p - skips, f, skips, g }' "$log"
for s in "${skips[@]}"; do echo "  skipped: $s"; done
grep -ao 'exitless-flaky: .*' "$log" | sed 's/^exitless-flaky: /  flaky: /' | sort -u
# Every panic's first lines, those of runs a rerun passed too, at the end where a CI excerpt
# keeps them (a flaky binary's first failure was otherwise kept only deep in the log).
awk '/^---- .* stdout ----$/ { name = $2 }
    /panicked at/ { n = 5; printf "  panic in %s:\n", name }
    n > 0 { print "    " substr($0, 1, 300); n--; shown++ }
    shown >= 120 { print "    (more in the full log)"; exit }' "$log"
if [ "${EXITLESS_FAIL_ON_SKIP:-0}" = 1 ] && [ ${#skips[@]} -gt 0 ]; then
    echo "tools/test.sh: ${#skips[@]} skipped with EXITLESS_FAIL_ON_SKIP=1: every test must run here"
    failed=1
fi
exit "$failed"
