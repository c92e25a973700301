#!/usr/bin/env bash
# Fuzzes exitless's parsers of guest- and user-controlled input (the targets in fuzz/, over
# src/fuzzing.rs) with cargo-fuzz (libFuzzer), one target at a time.
#
#   tools/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     default: 60 s, every target
#
# Builds with `cargo +nightly fuzz build` (optimized, with debug assertions and overflow checks),
# then runs each target from its seed corpus (fuzz/corpus/TARGET, in the repository) plus what
# earlier runs found (fuzz/corpus-run/TARGET, local, where new inputs go). Prints the executions
# per target and every crash (the input is kept in fuzz/artifacts/TARGET/); exits 1 when a target
# crashed, 2 when the build failed, 3 when nightly or cargo-fuzz is missing. Targets run one at a time (the machine is
# shared); CARGO_TARGET_DIR is honoured (default fuzz/target).
set -uo pipefail

cd "$(dirname "$0")/../fuzz"

secs=60
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
    secs=$1
    shift
fi

all=(bzimage elf_sink api_line virtio_block virtio_rng virtio_balloon virtio_vsock virtio_net pci iommu acpi_e820 snapshot)
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=("${all[@]}")

# The longest input worth trying per target: a payload of a few KiB reaches every decoder's
# framing; a queue layout is at most ~430 bytes before its buffers.
max_len() {
    case $1 in
        bzimage | elf_sink) echo 65536 ;;
        api_line) echo 4096 ;;
        virtio_net) echo 16384 ;;
        acpi_e820) echo 64 ;;
        snapshot) echo 262144 ;;
        pci) echo 1200 ;;
        iommu) echo 40960 ;;
        *) echo 8192 ;;
    esac
}

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: no nightly toolchain (rustup toolchain install nightly)" >&2
    exit 3
fi
if ! cargo +nightly fuzz --help >/dev/null 2>&1; then
    echo "fuzz: cargo-fuzz is not installed (cargo install cargo-fuzz)" >&2
    exit 3
fi

echo "fuzz: building ${targets[*]}"
build_log=$(mktemp)
if ! cargo +nightly fuzz build >"$build_log" 2>&1; then
    tail -30 "$build_log" >&2
    rm -f "$build_log"
    echo "fuzz: build failed" >&2
    exit 2
fi
rm -f "$build_log"

crashed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus-run/$t" "corpus/$t"
    log=$(mktemp)
    start=$SECONDS
    cargo +nightly fuzz run "$t" "corpus-run/$t" "corpus/$t" -- \
        -max_total_time="$secs" -max_len="$(max_len "$t")" -rss_limit_mb=2048 -timeout=20 \
        -print_final_stats=1 >"$log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
    printf 'fuzz: %-15s %10s executions in %4d s (%s, corpus %d inputs)\n' "$t" "${execs:-?}" \
        $((SECONDS - start)) "${cov:-cov: ?}" "$(ls "corpus-run/$t" "corpus/$t" | wc -l)"
    if [[ $rc -ne 0 ]]; then
        crashed+=("$t")
        echo "fuzz: $t CRASHED (status $rc):" >&2
        grep -E "panicked|ERROR: libFuzzer|SUMMARY|Test unit written|Base64" "$log" | head -20 >&2
        grep -A30 "panicked" "$log" | head -40 >&2
    fi
    rm -f "$log"
done

if [[ ${#crashed[@]} -gt 0 ]]; then
    echo "fuzz: crashes in ${crashed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz: no crash in ${#targets[@]} targets"
