#!/usr/bin/env bash
# Runs `exitless run ...` in a jail made with the host's own tools (util-linux unshare, coreutils
# chroot, setpriv), as Firecracker's jailer does: new mount, PID and network namespaces, a chroot
# on a fresh tmpfs that holds only the binary, its libraries and the files the VM names, /dev
# with only kvm (and net/tun with --tun) owned by the jail's user, and that user with no
# capabilities. exitless itself then adds Landlock and seccomp (both on by default).
#
#   tools/jail.sh [--user UID:GID] [--ro PATH]... [--rw PATH]... [--netns NAME] [--tun]
#                 [--exitless BIN] -- RUN-ARGS...
#
#   --user UID:GID  who exitless runs as (default 65534:65534, nobody:nogroup)
#   --ro PATH       a file or directory the VM reads (kernel, initrd, read-only disk), mounted
#                   read-only at the same path inside the jail
#   --rw PATH       one it writes (a disk image, a directory for sockets, logs and the report);
#                   it must already be writable by the jail's user
#   --netns NAME    run in this existing network namespace (where a pre-created tap lives:
#                   `ip tuntap add NAME mode tap user UID`); default: a new, empty one
#   --tun           give the jail /dev/net/tun (for --net tap=...)
#   --exitless BIN  the binary (default: exitless on PATH)
#
# Paths keep their names inside the jail, so RUN-ARGS are what they would be outside. Needs
# root (it makes the namespaces, the device nodes and the chroot, then drops to the user before
# exitless starts). Prints `jail: ...` lines on stderr; exits with exitless's status.
set -euo pipefail

user=65534:65534
ro=()
rw=()
netns=
tun=0
bin=$(command -v exitless || true)
while [[ $# -gt 0 ]]; do
    case $1 in
        --user) user=$2; shift 2 ;;
        --ro) ro+=("$(realpath -m "$2")"); shift 2 ;;
        --rw) rw+=("$(realpath -m "$2")"); shift 2 ;;
        --netns) netns=$2; shift 2 ;;
        --tun) tun=1; shift ;;
        --exitless) bin=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "jail: unknown option $1 (see the head of $0)" >&2; exit 2 ;;
    esac
done
[[ $(id -u) -eq 0 ]] || { echo "jail: needs root (namespaces, device nodes, chroot)" >&2; exit 2; }
[[ -n $bin && -x $bin ]] || { echo "jail: no exitless binary (--exitless BIN)" >&2; exit 2; }
[[ -c /dev/kvm ]] || { echo "jail: no /dev/kvm" >&2; exit 2; }
bin=$(realpath "$bin")
uid=${user%%:*}
gid=${user##*:}

# The inside: runs as PID 1 of the new PID namespace, in the new mount namespace.
inside() {
    local root
    root=$(mktemp -d /tmp/exitless-jail.XXXXXX)
    # A tmpfs of our own: device nodes work on it (the host's /tmp may be nodev), and it goes
    # away with the namespace.
    mount -t tmpfs -o mode=0755,size=16m exitless-jail "$root"
    mkdir -p "$root/dev/net" "$root/proc" "$root/tmp" "$root/sys/module" "$root/bin"
    chmod 1777 "$root/tmp"
    node() { # PATH: the same device as on the host, owned by the jail's user
        local majmin
        majmin=$(stat -c '%t %T' "$1")
        mknod -m 0600 "$root$1" c $((16#${majmin% *})) $((16#${majmin#* }))
        chown "$uid:$gid" "$root$1"
    }
    node /dev/kvm
    [[ $tun -eq 0 ]] || node /dev/net/tun
    mknod -m 0666 "$root/dev/null" c 1 3
    # This PID namespace's /proc (exitless reads /proc/self), and the KVM modules' parameters
    # (what the host's KVM is), read-only.
    mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
    mount --rbind -o ro /sys/module "$root/sys/module"
    mount -o remount,bind,ro "$root/sys/module"
    bind() { # MODE PATH: at the same path inside
        local dst=$root$2
        if [[ -d $2 ]]; then mkdir -p "$dst"; else mkdir -p "$(dirname "$dst")"; touch "$dst"; fi
        mount --bind "$2" "$dst"
        [[ $1 = rw ]] || mount -o remount,bind,ro,nosuid,nodev "$dst"
    }
    bind ro "$bin"
    # The binary's libraries and loader, read-only, where the loader looks for them.
    for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
        bind ro "$lib"
    done
    for p in "${ro[@]}"; do bind ro "$p"; done
    for p in "${rw[@]}"; do bind rw "$p"; done
    mount -o remount,ro,bind "$root"
    echo "jail: root $root (tmpfs, read-only), user $uid:$gid, $(ls "$root/dev" | tr '\n' ' ')" >&2
    # The capability bounding set keeps only what chroot needs to enter and drop to the user;
    # the user then has no capabilities (effective, permitted, inheritable, ambient) and
    # no_new_privs holds: no set-uid or file-capability binary can give any back.
    exec setpriv --bounding-set=-all,+sys_chroot,+setuid,+setgid --inh-caps=-all \
        --no-new-privs \
        chroot --userspec="$uid:$gid" --groups="$gid" "$root" "$bin" run "$@"
}

export -f inside
export bin uid gid tun
export ro_list="${ro[*]:-}" rw_list="${rw[*]:-}"
ns=(unshare --mount --pid --fork --propagation private)
if [[ -n $netns ]]; then
    ns=(ip netns exec "$netns" "${ns[@]}")
else
    ns+=(--net)
fi
# Arrays do not cross `export`: pass them as words again.
exec "${ns[@]}" bash -c '
    set -euo pipefail
    read -ra ro <<<"$ro_list"
    read -ra rw <<<"$rw_list"
    inside "$@"' jail "$@"
