#!/usr/bin/env bash
# Build the exec-sandbox guest kernel (uncompressed vmlinux, PVH entry) from
# Debian's linux-source-6.1 package.
#
# Usage: build-kernel.sh OUT_DIR
# Writes OUT_DIR/vmlinux and OUT_DIR/kernel.lock.
#
# Inputs (environment):
#   SBX_KERNEL_FRAGMENT  Kconfig fragment   (default: <script dir>/kernel/config.fragment)
#   SBX_KERNEL_PATCH     patch for the tree (default: <script dir>/kernel/boot-calibration.patch)
#   SBX_BUILD_CACHE      cache directory    (default: ${XDG_CACHE_HOME:-$HOME/.cache}/exec-sandbox/build)
# This script may be run as `bash -c "$(cat build-kernel.sh)" build-kernel OUT_DIR`
# from any directory: then SBX_KERNEL_FRAGMENT and SBX_KERNEL_PATCH must be set.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive LC_ALL=C

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'build-kernel: error: %s\n' "$*" >&2; exit 1; }

[ "$#" -eq 1 ] || die "usage: build-kernel.sh OUT_DIR"
[ "$(id -u)" -eq 0 ] || die "must run as root (installs packages with apt-get)"
OUT_DIR=$1

KSRC_PKG=linux-source-6.1
script_dir=$(dirname -- "${BASH_SOURCE[0]:-$0}")
FRAGMENT=${SBX_KERNEL_FRAGMENT:-$script_dir/kernel/config.fragment}
PATCH_FILE=${SBX_KERNEL_PATCH:-$script_dir/kernel/boot-calibration.patch}
[ -f "$FRAGMENT" ] || die "kernel config fragment not found: $FRAGMENT (set SBX_KERNEL_FRAGMENT)"
[ -f "$PATCH_FILE" ] || die "kernel patch not found: $PATCH_FILE (set SBX_KERNEL_PATCH)"
FRAGMENT=$(readlink -f -- "$FRAGMENT")
PATCH_FILE=$(readlink -f -- "$PATCH_FILE")
CACHE=${SBX_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/exec-sandbox/build}

# --- tools ------------------------------------------------------------------
pkg_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}
ensure_packages() {
    local missing=() p
    for p in "$@"; do pkg_installed "$p" || missing+=("$p"); done
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "installing ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}
ensure_packages "$KSRC_PKG" make gcc libc6-dev bc bison flex libelf-dev libssl-dev \
    xz-utils patch binutils util-linux
# Not a build tool, but the first build is where a fresh machine gets everything it needs:
# the VM runtime itself.
ensure_packages qemu-system-x86

KVER=$(dpkg-query -W -f='${Version}' "$KSRC_PKG")
KTAR=/usr/src/$KSRC_PKG.tar.xz
[ -f "$KTAR" ] || die "$KTAR missing although $KSRC_PKG is installed"

# --- source tree (reused while the package version is unchanged) ------------
kcache=$CACHE/kernel
src=$kcache/src-$KVER
obj=$kcache/obj-$KVER
mkdir -p "$kcache"
# One build at a time per cache directory.
exec 9>"$kcache/.lock"
flock 9
for old in "$kcache"/src-* "$kcache"/obj-*; do
    [ -e "$old" ] || continue
    case $old in "$src" | "$obj") ;; *) log "removing stale $old"; rm -rf -- "$old" ;; esac
done
if [ ! -f "$src/.sbx-extracted" ]; then
    log "extracting $KSRC_PKG $KVER into $src"
    rm -rf -- "$src" "$src.tmp"
    mkdir -p "$src.tmp"
    tar -xJf "$KTAR" -C "$src.tmp" --strip-components=1
    : >"$src.tmp/.sbx-extracted"
    mv -- "$src.tmp" "$src"
fi

# Keep a copy of the applied patch in the tree so a changed patch can be
# reverted and the new one applied without re-extracting.
applied=$src/.sbx-applied.patch
if [ -f "$applied" ] && ! cmp -s "$applied" "$PATCH_FILE"; then
    log "reverting previously applied patch"
    patch -d "$src" -p1 -R -s --no-backup-if-mismatch <"$applied"
    rm -f -- "$applied"
fi
if [ ! -f "$applied" ]; then
    log "applying $(basename -- "$PATCH_FILE")"
    patch -d "$src" -p1 -s --no-backup-if-mismatch <"$PATCH_FILE"
    cp -- "$PATCH_FILE" "$applied"
fi

# --- configuration ----------------------------------------------------------
mkdir -p "$obj"
log "configuring (allnoconfig + fragment)"
make -s -C "$src" O="$obj" ARCH=x86_64 KCONFIG_ALLCONFIG="$FRAGMENT" allnoconfig >&2

log "verifying .config against the fragment"
mismatches=$(awk '
    FNR == NR {
        if (match($0, /^CONFIG_[A-Za-z0-9_]+=/)) { have[substr($0, 1, RLENGTH - 1)] = substr($0, RLENGTH + 1) }
        next
    }
    /^CONFIG_[A-Za-z0-9_]+=/ {
        match($0, /^CONFIG_[A-Za-z0-9_]+=/)
        sym = substr($0, 1, RLENGTH - 1); want = substr($0, RLENGTH + 1)
        got = (sym in have) ? sym "=" have[sym] : "not set"
        if (!(sym in have) || have[sym] != want) print "  wanted " $0 ", got " got
        next
    }
    /^# CONFIG_[A-Za-z0-9_]+ is not set$/ {
        sym = $2
        if ((sym in have) && have[sym] != "n") print "  wanted " sym " not set, got " sym "=" have[sym]
    }
' "$obj/.config" "$FRAGMENT")
if [ -n "$mismatches" ]; then
    printf 'build-kernel: error: .config does not match %s:\n%s\n' "$FRAGMENT" "$mismatches" >&2
    exit 1
fi

# --- build ---------------------------------------------------------------------
log "building vmlinux with -j$(nproc)"
start=$(date +%s)
make -s -C "$src" O="$obj" ARCH=x86_64 -j"$(nproc)" vmlinux >&2
log "vmlinux built in $(($(date +%s) - start)) s"

mkdir -p "$OUT_DIR"
tmp=$OUT_DIR/.vmlinux.tmp.$$
trap 'rm -f -- "$tmp" "$OUT_DIR/.kernel.lock.tmp.$$"' EXIT
# The symbol table is not loaded into guest memory anyway; stripping it only
# makes the file smaller (ELF notes, including the PVH entry note, are kept).
objcopy --strip-all "$obj/vmlinux" "$tmp"
mv -f -- "$tmp" "$OUT_DIR/vmlinux"

{
    printf '%s=%s\n' "$KSRC_PKG" "$KVER"
    printf 'gcc=%s\n' "$(dpkg-query -W -f='${Version}' gcc)"
    printf 'config.fragment sha256=%s\n' "$(sha256sum <"$FRAGMENT" | cut -d' ' -f1)"
    printf '%s sha256=%s\n' "$(basename -- "$PATCH_FILE")" "$(sha256sum <"$PATCH_FILE" | cut -d' ' -f1)"
} >"$OUT_DIR/.kernel.lock.tmp.$$"
mv -f -- "$OUT_DIR/.kernel.lock.tmp.$$" "$OUT_DIR/kernel.lock"
log "wrote $OUT_DIR/vmlinux ($(stat -c %s "$OUT_DIR/vmlinux") bytes) and $OUT_DIR/kernel.lock"
