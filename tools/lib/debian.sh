# tools/lib/debian.sh — shell helpers shared by the scripts that build images from Debian packages
# (debian-guest.sh: the default Linux guest; svm-host.sh: the emulated SVM host). Sourced, not run.
# The caller defines die() and log() and sets DEBS (where downloaded .debs are kept).

deb_apt_updated=0

# deb_update: `apt-get update` once per script run.
deb_update() {
    [ "$deb_apt_updated" = 1 ] && return 0
    log "running apt-get update"
    apt-get update >/dev/null || die "apt-get update failed (run as root, or run it yourself first)"
    deb_apt_updated=1
}

# deb_download PACKAGE: fetch PACKAGE's .deb into $DEBS unless already there (apt-get update once
# if the first attempt fails: stale or empty package lists). Prints the .deb's path.
deb_download() {
    local pkg="$1" debs
    if ! compgen -G "$DEBS/${pkg}_*.deb" >/dev/null; then
        log "downloading $pkg"
        if ! (cd "$DEBS" && apt-get download "$pkg" >/dev/null 2>&1); then
            deb_update
            (cd "$DEBS" && apt-get download "$pkg" >/dev/null) || die "apt-get download $pkg failed"
        fi
    fi
    debs=("$DEBS/${pkg}"_*.deb)
    [ -f "${debs[-1]}" ] || die "downloaded $pkg not found in $DEBS"
    echo "${debs[-1]}"
}

# deb_kernel_package: the cloud kernel meta package's current versioned kernel package, e.g.
# linux-image-6.1.0-57-cloud-amd64.
deb_kernel_package() {
    local k
    k="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ { print $2; exit }')"
    if [ -z "$k" ]; then
        deb_update
        k="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
            awk '/Depends: linux-image-[0-9]/ { print $2; exit }')"
    fi
    [ -n "$k" ] || die "cannot resolve linux-image-cloud-amd64's kernel package (is this Debian with main enabled?)"
    echo "$k"
}

# module_decompress SRC DST: a module file in any of the kernel's formats, uncompressed.
module_decompress() {
    case "$1" in
    *.ko) cp "$1" "$2" ;;
    *.ko.xz) xz -dc "$1" >"$2" || die "xz failed on $1 (install xz-utils)" ;;
    *.ko.zst) zstd -dcq "$1" >"$2" || die "zstd failed on $1 (install zstd)" ;;
    *.ko.gz) gzip -dc "$1" >"$2" || die "gzip failed on $1" ;;
    *) die "unknown module format: $1" ;;
    esac
}

# module_closure MODDIR OUTDIR NAME...: the named modules of the kernel tree MODDIR
# (/lib/modules/VERSION) and their dependencies, decompressed into OUTDIR as NAME.ko; sets the
# array MODULE_LOAD_ORDER (dependencies first). Debian's packages ship no modules.dep (depmod
# makes it at install time), so dependencies come from each module's own .modinfo `depends=`.
# Modules built into the kernel are skipped with a note; a module that is absent is an error
# unless its name ends in '?'.
module_closure() {
    local moddir="$1" out="$2" mod name
    shift 2
    declare -gA mc_path_of=() mc_builtin=() mc_seen=()
    MODULE_LOAD_ORDER=()
    mkdir -p "$out"
    while IFS= read -r mod; do
        name="${mod##*/}"
        name="${name%%.ko*}"
        mc_path_of[${name//-/_}]="$mod"
    done < <(find "$moddir/kernel" -name '*.ko*')
    if [ -f "$moddir/modules.builtin" ]; then
        while IFS= read -r mod; do
            name="${mod##*/}"
            name="${name%%.ko*}"
            mc_builtin[${name//-/_}]=1
        done <"$moddir/modules.builtin"
    fi
    for name in "$@"; do
        module_visit "$out" "$name"
    done
}

module_visit() {
    local out="$1" name="${2//-/_}" optional=0 dep deps
    case "$name" in *\?) optional=1 name="${name%\?}" ;; esac
    [ -z "${mc_seen[$name]:-}" ] || return 0
    mc_seen[$name]=1
    if [ -z "${mc_path_of[$name]:-}" ]; then
        if [ -n "${mc_builtin[$name]:-}" ]; then
            log "module $name is built into the kernel"
        elif [ "$optional" = 1 ]; then
            log "warning: module $name not found"
        else
            die "module $name not found in the kernel package"
        fi
        return 0
    fi
    module_decompress "${mc_path_of[$name]}" "$out/$name.ko"
    deps="$(tr '\0' '\n' <"$out/$name.ko" | sed -n 's/^depends=//p')"
    for dep in ${deps//,/ }; do
        module_visit "$out" "$dep"
    done
    MODULE_LOAD_ORDER+=("$name")
}

# copy_libs ROOT ELF: copies the shared libraries and loader that `ldd` lists for ELF into ROOT at
# their absolute paths (following symlinks).
copy_libs() {
    local root="$1" lib
    while IFS= read -r lib; do
        [ -e "$root$lib" ] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done < <(ldd "$2" 2>/dev/null | awk '/=> \// { print $3 } /^\t\// { print $1 }')
}

# copy_with_libs ROOT FILE...: copies each FILE (following symlinks) into ROOT at the same
# absolute path, and for ELF executables the shared libraries and loader `ldd` lists.
copy_with_libs() {
    local root="$1" f
    shift
    for f in "$@"; do
        [ -e "$f" ] || die "$f does not exist"
        mkdir -p "$root$(dirname "$f")"
        cp -L "$f" "$root$f"
        if head -c 4 "$f" | grep -q ELF; then
            copy_libs "$root" "$f"
        fi
    done
}

# newc_entry NAME MODE MAJOR MINOR: one newc header + name, padded to 4 bytes, for a device node
# an unprivileged build cannot mknod (the kernel unpacks concatenated archives in order).
newc_entry() {
    local name="$1" mode="$2" rmaj="$3" rmin="$4" namesize hdr pad
    namesize=$((${#name} + 1))
    hdr=$(printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        0 "$mode" 0 0 1 0 0 0 0 "$rmaj" "$rmin" "$namesize" 0)
    printf '%s%s\0' "$hdr" "$name"
    pad=$(((4 - (110 + namesize) % 4) % 4))
    head -c "$pad" /dev/zero
}

# newc_archive DIR: DIR's tree as an uncompressed newc archive on stdout, owned by root, plus a
# /dev/console node (5,1).
newc_archive() {
    (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0)
    newc_entry dev/console $((0020600)) 5 1
    newc_entry TRAILER!!! 0 0 0
}

# busybox_tree ROOT BUSYBOX: the busybox binary at ROOT/bin/busybox and a link for each applet.
busybox_tree() {
    local root="$1" bb="$2" applet
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin}
    cp "$bb" "$root/bin/busybox"
    for applet in $("$root/bin/busybox" --list-full 2>/dev/null || true); do
        [ "$applet" = bin/busybox ] && continue
        mkdir -p "$root/$(dirname "$applet")"
        ln -sf /bin/busybox "$root/$applet"
    done
    # --list-full needs to run busybox on the build host; make sure the essentials exist.
    for applet in sh mount insmod cat echo setsid cttyhack nproc poweroff stty; do
        [ -e "$root/bin/$applet" ] || [ -e "$root/sbin/$applet" ] || ln -sf /bin/busybox "$root/bin/$applet"
    done
}
