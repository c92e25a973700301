#!/usr/bin/env bash
# Fuzzes the control API (`--api-socket`) of a running VM against its OpenAPI document
# (docs/api.yaml) with schemathesis, and checks that the VM lives through it.
#
#   tools/api-fuzz.sh [--examples N] [--seconds S] [--seed SEED]
#   tools/api-fuzz.sh --install-only      only create (or check) the venv; exit 3 if it cannot be
#
# --examples N: test cases per operation and phase (default 100); --seconds S: a time budget for
# the random phase instead (schemathesis repeats fuzzing until it is spent).
#
# Owns: the pinned schemathesis venv (outside the repository, in
# ${EXITLESS_SCHEMATHESIS_VENV:-~/.cache/exitless-schemathesis/venv-VERSION}), one VM (the kit's
# clock guest, which ticks until told to stop, with a balloon and a --snapshot-dir in a scratch
# directory), and a TCP bridge to its socket (socat on 127.0.0.1: schemathesis speaks HTTP over
# TCP only). Every check of schemathesis runs (`--checks all`: no 5xx, status codes, content
# types and bodies as documented, bad data refused, good data accepted, 405 with Allow, ...),
# with a fixed seed and one worker (the API serves 8 connections at once), each request on its
# own connection (`Connection: close`): schemathesis keeps a session per operation and pass, and
# their idle keep-alive connections filled the 8 slots when a --seconds run started its next
# pass (the 9th was refused, and socat lost the 503 in the bridge).
#
# The operations that end the VM or write files are handled deliberately, in phases:
#   1. random: every operation but snapshotVm and shutdownVm (pause and resume included: the VM
#      is paused and resumed at random; every answer must match the document in either state);
#   2. snapshot: the VM paused; snapshotVm with the document's example pointed into the scratch
#      --snapshot-dir, so the examples phase writes one real snapshot there (a 200 checked
#      against SnapshotSummary) and every other generated directory is refused (outside
#      --snapshot-dir, or already holding one); nothing is written outside the scratch directory;
#   3. shutdown, negative: shutdownVm with bodies that violate its schema only (wrong types,
#      values out of range, unknown keys, other content types, random bytes): each must be
#      refused and the VM must still run afterwards (tools/api_fuzz_hooks.py drops the bodyless,
#      valid, case that schemathesis sends even in negative mode);
#   4. the end: the VM resumed if paused, its API answering (GET /api/v1/vm) and its guest ticking
#      again; then `PUT /api/v1/vm/shutdown` (quit) must stop it with status 0.
# Exits 0 when every phase passed and the VM neither died nor crashed; 1 otherwise (the scratch
# directory, with schemathesis' reports and the VM's console and stderr, is kept and named);
# 3 when schemathesis cannot be installed (no network), 2 on bad usage.
# Environment: EXITLESS_BIN (the exitless binary; default: built with cargo, release),
# EXITLESS_SCHEMATHESIS_VENV, CARGO_TARGET_DIR.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
repo=$PWD

ST_VERSION=4.32.5
venv=${EXITLESS_SCHEMATHESIS_VENV:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/exitless-schemathesis/venv-$ST_VERSION}
examples=100
seconds=""
seed=20261207
install_only=0

usage() { sed -n '5,9p' "$0" >&2; exit 2; }
say() { echo "api-fuzz: $*" >&2; }
while [ $# -gt 0 ]; do
    case $1 in
    --examples) examples=${2:-}; shift 2 || usage ;;
    --seconds) seconds=${2:-}; shift 2 || usage ;;
    --seed) seed=${2:-}; shift 2 || usage ;;
    --install-only) install_only=1; shift ;;
    *) usage ;;
    esac
done
[[ $examples =~ ^[0-9]+$ && $seed =~ ^[0-9]+$ ]] || usage
[[ -z $seconds || $seconds =~ ^[0-9]+$ ]] || usage

# --- the venv ---------------------------------------------------------------------------------
install_schemathesis() {
    if "$venv/bin/st" --version 2>/dev/null | grep -qF "$ST_VERSION"; then
        return 0
    fi
    say "installing schemathesis $ST_VERSION into $venv"
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")" &&
        python3 -m venv "$venv" &&
        "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$ST_VERSION" &&
        "$venv/bin/st" --version | grep -qF "$ST_VERSION"
}
if ! install_schemathesis; then
    say "cannot install schemathesis $ST_VERSION (python3 -m venv, pip install: no network?)"
    exit 3
fi
[ "$install_only" = 1 ] && { say "schemathesis $ST_VERSION is ready in $venv"; exit 0; }
command -v socat >/dev/null || { say "socat is missing (apt-get install socat)"; exit 1; }

# --- the VM and the bridge ----------------------------------------------------------------------
bin=${EXITLESS_BIN:-}
if [ -z "$bin" ]; then
    cargo build --release -q || { say "cargo build failed"; exit 1; }
    bin=${CARGO_TARGET_DIR:-$repo/target}/release/exitless
fi
work=$(mktemp -d /tmp/exitless-api-fuzz.XXXXXX)
sock=$work/api.sock
vm_pid=""
bridge_pid=""
cleanup() {
    [ -n "$bridge_pid" ] && kill "$bridge_pid" 2>/dev/null
    [ -n "$vm_pid" ] && kill "$vm_pid" 2>/dev/null
    wait 2>/dev/null
}
trap cleanup EXIT

ctl() { "$bin" ctl --socket "$sock" "$@"; }
ticks() { local n; n=$(grep -c "^kit: tick " "$work/console.log" 2>/dev/null); echo "${n:-0}"; }
vm_alive() { kill -0 "$vm_pid" 2>/dev/null; }

start_vm() {
    mkdir -p "$work/snaps"
    "$bin" run --guest clock --cpus 2 --balloon size=0 --timeout 3600 \
        --api-socket "$sock" --snapshot-dir "$work/snaps" \
        --console-log "$work/console.log" --stats-json "$work/report.json" \
        </dev/null >/dev/null 2>"$work/vm.stderr" &
    vm_pid=$!
    for _ in $(seq 600); do
        vm_alive || { say "the VM ended at start: $(cat "$work/vm.stderr")"; return 1; }
        [ "$(ticks)" -ge 1 ] && ctl state >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    say "the VM did not come up in 60 s"
    return 1
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start_bridge() {
    port=$(free_port)
    socat "TCP-LISTEN:$port,bind=127.0.0.1,reuseaddr,fork" "UNIX-CONNECT:$sock" 2>"$work/socat.stderr" &
    bridge_pid=$!
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.1
    done
    say "the bridge did not listen on 127.0.0.1:$port"
    return 1
}

# --- the phases ---------------------------------------------------------------------------------
# st NAME ARGS...: one schemathesis run over the document, with every check and a fixed seed.
st() {
    local name=$1
    shift
    say "phase $name"
    (cd "$work" && PYTHONPATH="$repo/tools" SCHEMATHESIS_HOOKS=api_fuzz_hooks "$venv/bin/st" run "$work/api.yaml" --url "http://127.0.0.1:$port" \
        --checks all --seed "$seed" --workers 1 --request-timeout 20 --header "Connection: close" \
        --generation-database none --no-color --report junit,ndjson \
        --report-dir "$work/report-$name" "$@")
}

random_phase() {
    local budget=(--max-examples "$examples")
    [ -n "$seconds" ] && budget+=(--max-time "$seconds")
    st random "${budget[@]}" --exclude-operation-id snapshotVm --exclude-operation-id shutdownVm
}

snapshot_phase() {
    ctl state | grep -q '"paused"' || ctl pause >/dev/null || return 1
    st snapshot --max-examples "$examples" --include-operation-id snapshotVm || return 1
    [ -f "$work/snaps/example/state.json" ] || { say "the example snapshot was not written"; return 1; }
    ctl resume >/dev/null
}

shutdown_phase() {
    st shutdown-negative --mode negative --max-examples "$examples" --include-operation-id shutdownVm
}

# The VM answers, runs (resumed if a phase left it paused) and its guest ticks on.
still_running() {
    vm_alive || { say "the VM died: $(tail -n 20 "$work/vm.stderr")"; return 1; }
    ctl state | grep -q '"paused"' && ctl resume >/dev/null
    ctl state | grep -q '"running"' || { say "GET /api/v1/vm: $(ctl state)"; return 1; }
    local before
    before=$(ticks)
    for _ in $(seq 100); do
        [ "$(ticks)" -gt "$before" ] && return 0
        sleep 0.1
    done
    say "the guest did not tick in 10 s after the fuzzing"
    return 1
}

quit_vm() {
    ctl quit >/dev/null || { say "quit was refused"; return 1; }
    wait "$vm_pid"
    local st=$?
    vm_pid=""
    grep -q "stopped through the control API" "$work/vm.stderr" && [ "$st" = 0 ] && return 0
    say "the VM ended with status $st: $(tail -n 20 "$work/vm.stderr")"
    return 1
}

# The document, with the snapshot example pointed into the scratch --snapshot-dir.
sed "s|example: /var/lib/vms/snap1|example: $work/snaps/example|" docs/api.yaml >"$work/api.yaml"
start_vm || exit 1
start_bridge || exit 1
failed=()
random_phase || failed+=(random)
vm_alive && { snapshot_phase || failed+=(snapshot); }
vm_alive && { shutdown_phase || failed+=(shutdown-negative); }
still_running || failed+=(alive)
quit_vm || failed+=(quit)
if [ ${#failed[@]} -gt 0 ]; then
    trap - EXIT
    cleanup
    say "FAILED: ${failed[*]} (seed $seed; reports, console and VM stderr in $work)"
    exit 1
fi
rm -rf "$work"
say "passed: every phase, the VM alive and answering to the end, then quit (seed $seed)"
