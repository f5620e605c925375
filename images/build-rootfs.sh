#!/usr/bin/env bash
# Build a read-only guest root filesystem (EROFS, uncompressed) from Debian packages.
#
# Usage: build-rootfs.sh LANGUAGE OUT_DIR      LANGUAGE: python | javascript | raw
# Writes OUT_DIR/rootfs-LANGUAGE.erofs and OUT_DIR/rootfs-LANGUAGE.lock.
#
# Inputs (environment):
#   SBX_VERSIONS_ENV   pinned versions (default: <script dir>/versions.env)
#   SBX_BUILD_CACHE    cache directory (default: ${XDG_CACHE_HOME:-$HOME/.cache}/exec-sandbox/build)
#   SBX_DEBIAN_MIRROR  Debian mirror URL (default: the host's apt configuration)
#   SBX_NPM_REGISTRY   npm registry URL (default: `npm config get registry`)
#   SBX_FORCE_REBUILD  set to 1 to ignore the cached image
# This script may be run as `bash -c "$(cat build-rootfs.sh)" build-rootfs LANGUAGE OUT_DIR`
# from any directory: then SBX_VERSIONS_ENV must be set.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true LC_ALL=C

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'build-rootfs: error: %s\n' "$*" >&2; exit 1; }

[ "$#" -eq 2 ] || die "usage: build-rootfs.sh python|javascript|raw OUT_DIR"
LANGUAGE=$1
OUT_DIR=$2
[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, chroot, apt-get)"

# Packages on top of debootstrap's minbase, per language.
COMMON_PKGS="ca-certificates tzdata"
case $LANGUAGE in
    python) LANG_PKGS="python3" ;;
    javascript) LANG_PKGS="" ;;
    raw) LANG_PKGS="bash git curl jq coreutils grep sed gawk findutils diffutils patch less make tree tar gzip unzip file" ;;
    *) die "unknown LANGUAGE '$LANGUAGE' (expected python, javascript or raw)" ;;
esac

script_dir=$(dirname -- "${BASH_SOURCE[0]:-$0}")
VERSIONS_ENV=${SBX_VERSIONS_ENV:-$script_dir/versions.env}
[ -f "$VERSIONS_ENV" ] || die "versions file not found: $VERSIONS_ENV (set SBX_VERSIONS_ENV)"
# shellcheck disable=SC1090
. "$VERSIONS_ENV"
SUITE=${DEBIAN_SUITE:-bookworm}
if [ "$LANGUAGE" = javascript ]; then
    [ -n "${BUN_VERSION:-}" ] || die "BUN_VERSION missing in $VERSIONS_ENV"
fi
CACHE=${SBX_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/exec-sandbox/build}
RCACHE=$CACHE/rootfs

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
ensure_packages debootstrap debian-archive-keyring erofs-utils wget util-linux
if [ "$LANGUAGE" = javascript ] && ! command -v npm >/dev/null 2>&1; then
    ensure_packages npm
fi

# --- cache key: this script, the language and the pinned versions -----------
if [ -n "${BASH_EXECUTION_STRING:-}" ]; then
    script_text=$BASH_EXECUTION_STRING
else
    script_text=$(cat -- "${BASH_SOURCE[0]:-$0}")
fi
KEY=$({
    printf '%s\n' "$script_text"
    printf 'language=%s\nsuite=%s\n' "$LANGUAGE" "$SUITE"
    [ "$LANGUAGE" = javascript ] && printf 'bun=%s %s\n' "$BUN_VERSION" "${BUN_SHA512:-}"
    true
} | sha256sum | cut -c1-16)
cached_img=$RCACHE/$LANGUAGE-$KEY.erofs
cached_lock=$RCACHE/$LANGUAGE-$KEY.lock

mkdir -p "$RCACHE" "$OUT_DIR"
# One build at a time per cache: the .deb cache is shared between languages.
exec 9>"$RCACHE/.lock"
flock 9

tree=$RCACHE/$LANGUAGE.tree
out_img=$OUT_DIR/rootfs-$LANGUAGE.erofs
out_lock=$OUT_DIR/rootfs-$LANGUAGE.lock

unmount_tree() {
    local m
    [ -d "$tree" ] || return 0
    awk -v t="$tree/" 'index($2, t) == 1 { print $2 }' /proc/self/mounts | sort -r |
        while read -r m; do umount -l -- "$m" 2>/dev/null || true; done
}
cleanup() {
    unmount_tree
    rm -f -- "$cached_img.tmp" "$cached_lock.tmp" "$out_img.tmp.$$" "$out_lock.tmp.$$"
}
trap cleanup EXIT

install_outputs() {
    cp -- "$cached_img" "$out_img.tmp.$$"
    cp -- "$cached_lock" "$out_lock.tmp.$$"
    mv -f -- "$out_img.tmp.$$" "$out_img"
    mv -f -- "$out_lock.tmp.$$" "$out_lock"
    log "wrote $out_img ($(stat -c %s "$out_img") bytes) and $out_lock"
}

if [ "${SBX_FORCE_REBUILD:-0}" != 1 ] && [ -f "$cached_img" ] && [ -f "$cached_lock" ]; then
    log "$LANGUAGE root filesystem is cached (key $KEY)"
    install_outputs
    exit 0
fi

# --- Debian mirror from the host's apt configuration ------------------------
debian_mirror() {
    local f uri=
    if [ -n "${SBX_DEBIAN_MIRROR:-}" ]; then
        printf '%s\n' "${SBX_DEBIAN_MIRROR%/}"
        return 0
    fi
    # deb822 files: first stanza of type deb with suite $SUITE and component main.
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri=$(awk -v suite="$SUITE" '
            BEGIN { RS = ""; FS = "\n" }
            {
                types = uris = suites = comps = ""; enabled = "yes"; key = ""
                for (i = 1; i <= NF; i++) {
                    line = $i
                    if (line ~ /^#/) continue
                    if (match(line, /^[A-Za-z-]+:/)) {
                        key = tolower(substr(line, 1, RLENGTH - 1)); val = substr(line, RLENGTH + 1)
                    } else if (line ~ /^[ \t]/) { val = line } else continue
                    if (key == "types") types = types " " val
                    else if (key == "uris") uris = uris " " val
                    else if (key == "suites") suites = suites " " val
                    else if (key == "components") comps = comps " " val
                    else if (key == "enabled") enabled = tolower(val)
                }
                if (enabled ~ /no/) next
                if ((types " ") !~ /[ \t]deb[ \t]/) next
                if ((suites " ") !~ ("[ \t]" suite "[ \t]")) next
                if ((comps " ") !~ /[ \t]main[ \t]/) next
                n = split(uris, u, /[ \t]+/)
                for (j = 1; j <= n; j++) if (u[j] != "") { print u[j]; exit }
            }' "$f")
        [ -n "$uri" ] && break
    done
    # One-line format: deb [options] URI SUITE COMPONENTS...
    if [ -z "$uri" ]; then
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            [ -f "$f" ] || continue
            uri=$(awk -v suite="$SUITE" '
                $1 == "deb" {
                    i = 2
                    if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                    if ($(i + 1) != suite) next
                    for (j = i + 2; j <= NF; j++) if ($j == "main") { print $i; exit }
                }' "$f")
            [ -n "$uri" ] && break
        done
    fi
    [ -n "$uri" ] || die "no '$SUITE main' archive in the host's apt sources; set SBX_DEBIAN_MIRROR"
    case $uri in
        http://* | https://* | ftp://* | file://*) ;;
        *) die "unsupported apt source '$uri' for debootstrap; set SBX_DEBIAN_MIRROR" ;;
    esac
    printf '%s\n' "${uri%/}"
}

run_in() { # run a command inside the tree with /proc mounted
    mount -t proc proc "$tree/proc"
    local rc=0
    chroot "$tree" "$@" || rc=$?
    umount "$tree/proc"
    return "$rc"
}

# --- Bun (javascript): the npm package's bin/bun -------------------------------
fetch_bun() {
    local registry dir tgz pkg=@oven/bun-linux-x64-baseline
    registry=${SBX_NPM_REGISTRY:-$(cd / && npm config get registry)}
    dir=$CACHE/npm
    tgz=$dir/oven-bun-linux-x64-baseline-$BUN_VERSION.tgz
    mkdir -p "$dir"
    if [ ! -f "$tgz" ]; then
        log "fetching $pkg@$BUN_VERSION with npm pack"
        rm -rf -- "$dir/tmp"
        mkdir -p "$dir/tmp"
        (cd "$dir/tmp" && npm pack "$pkg@$BUN_VERSION" --registry "$registry" \
            --ignore-scripts --pack-destination "$dir/tmp" --loglevel error >/dev/null)
        mv -- "$dir/tmp/$(basename -- "$tgz")" "$tgz"
        rm -rf -- "$dir/tmp"
    fi
    if [ -n "${BUN_SHA512:-}" ]; then
        local got
        got=$(sha512sum <"$tgz" | cut -d' ' -f1)
        if [ "$got" != "$BUN_SHA512" ]; then
            rm -f -- "$tgz"
            die "sha512 of $pkg@$BUN_VERSION is $got, versions.env pins $BUN_SHA512"
        fi
    fi
    printf '%s\n' "$tgz"
}

# --- build --------------------------------------------------------------------
MIRROR=$(debian_mirror)
log "building $LANGUAGE root filesystem from $SUITE ($MIRROR), key $KEY"
start=$(date +%s)

unmount_tree
rm -rf --one-file-system -- "$tree"
mkdir -p "$RCACHE/debs"
include=$(printf '%s\n' $COMMON_PKGS $LANG_PKGS | sort -u | paste -sd, -)
log "debootstrap --variant=minbase --include=$include"
if ! debootstrap --variant=minbase --include="$include" \
    --cache-dir="$(readlink -f -- "$RCACHE/debs")" \
    --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
    "$SUITE" "$tree" "$MIRROR" >"$RCACHE/debootstrap-$LANGUAGE.log" 2>&1; then
    tail -n 30 "$RCACHE/debootstrap-$LANGUAGE.log" >&2
    [ -f "$tree/debootstrap/debootstrap.log" ] && tail -n 30 "$tree/debootstrap/debootstrap.log" >&2
    die "debootstrap failed (log: $RCACHE/debootstrap-$LANGUAGE.log)"
fi
log "debootstrap done in $(($(date +%s) - start)) s"

extra_lock=
case $LANGUAGE in
    javascript)
        tgz=$(fetch_bun)
        log "installing bun $BUN_VERSION to /usr/local/bin/bun"
        mkdir -p "$tree/usr/local/bin"
        tar -xzf "$tgz" -O package/bin/bun >"$tree/usr/local/bin/bun.tmp"
        chmod 0755 "$tree/usr/local/bin/bun.tmp"
        mv -f -- "$tree/usr/local/bin/bun.tmp" "$tree/usr/local/bin/bun"
        got=$(run_in /usr/local/bin/bun --version) || die "bun does not run in the root filesystem"
        [ "$got" = "$BUN_VERSION" ] || die "bun --version says '$got', expected $BUN_VERSION"
        extra_lock="bun=$BUN_VERSION"
        ;;
    python)
        pyver=$(run_in /usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
        log "precompiling the Python $pyver standard library"
        # Debian's postinst leaves timestamp-based .pyc files; -f rewrites them
        # as unchecked-hash ones (never revalidated against the sources).
        # No -j: multiprocessing inside a bare chroot is unreliable.
        run_in /usr/bin/python3 -m compileall -q -f --invalidation-mode unchecked-hash \
            "/usr/lib/python$pyver" /usr/lib/python3/dist-packages >&2 ||
            die "compileall failed"
        ;;
esac

log "adding user 'user' (uid/gid 1000)"
run_in /usr/sbin/groupadd --gid 1000 user
run_in /usr/sbin/useradd --uid 1000 --gid 1000 --home-dir /home/user --no-create-home \
    --shell /bin/bash --no-log-init user
install -d -m 0755 -o 1000 -g 1000 "$tree/home/user"
install -d -m 1777 "$tree/tmp"
find "$tree/tmp" -mindepth 1 -delete

log "configuring /etc"
printf '127.0.0.1\tlocalhost\n' >"$tree/etc/hosts"
# Host-derived files debootstrap copies in: not wanted in the image.
rm -f -- "$tree/etc/resolv.conf" "$tree/etc/hostname" "$tree/etc/machine-id"
# The agent writes the resolver configuration into /run (a tmpfs it mounts at boot) when the
# VM has a network: the gateway is the only name server. Without one the link dangles.
ln -s ../run/resolv.conf "$tree/etc/resolv.conf"

# Untrusted code runs as uid 1000: no setuid/setgid programs (su, mount, ...).
find "$tree" -xdev -type f -perm /6000 -exec chmod ug-s -- {} +

log "stripping documentation, locales and package caches"
find "$tree/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete 2>/dev/null || true
find "$tree/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf -- "$tree/usr/share/man" "$tree/usr/share/info" "$tree/usr/share/doc-base" \
    "$tree/usr/share/lintian" "$tree/usr/share/linda" "$tree/usr/share/locale" \
    "$tree/usr/share/i18n" "$tree/var/lib/apt/lists" "$tree/var/cache/apt" \
    "$tree/var/cache/debconf"/*-old "$tree/var/lib/dpkg"/*-old "$tree/debootstrap"
mkdir -p "$tree/usr/share/locale" "$tree/var/lib/apt/lists/partial" "$tree/var/cache/apt/archives/partial"
# Keep only the C.UTF-8 locale (built into glibc's /usr/lib/locale/C.utf8).
if [ -d "$tree/usr/lib/locale" ]; then
    find "$tree/usr/lib/locale" -mindepth 1 -maxdepth 1 ! -name C.utf8 -exec rm -rf -- {} +
fi
find "$tree/var/log" -type f -delete
rm -f -- "$tree/var/cache/ldconfig/aux-cache"

log "writing package lock"
lock_tmp=$cached_lock.tmp
{
    chroot "$tree" dpkg-query -W -f='${db:Status-Abbrev} ${Package}=${Version}\n' |
        awk '$1 == "ii" { print $2 }'
    [ -n "$extra_lock" ] && printf '%s\n' "$extra_lock"
    true
} | sort >"$lock_tmp"

unmount_tree
# Uncompressed: under TCG the guest's lz4 decompression of every block a cold start reads is
# emulated too. 6 alternating cold runs each (docs/measurements.md): python 1230-1274 ->
# 1187-1242 ms, javascript 2205-2421 -> 2011-2113 ms, raw 881-980 -> 826-868 ms, for images
# 1.7-1.9x the size (clones restore the page cache and read nothing).
log "mkfs.erofs (uncompressed)"
rm -f -- "$cached_img.tmp"
mkfs.erofs "$cached_img.tmp" "$tree" >"$RCACHE/mkfs-$LANGUAGE.log" 2>&1 ||
    { tail -c 2000 "$RCACHE/mkfs-$LANGUAGE.log" >&2; die "mkfs.erofs failed"; }
# Drop images from older keys, then publish the new one.
find "$RCACHE" -maxdepth 1 -name "$LANGUAGE-*.erofs" ! -name "$LANGUAGE-$KEY.erofs" -delete
find "$RCACHE" -maxdepth 1 -name "$LANGUAGE-*.lock" ! -name "$LANGUAGE-$KEY.lock" -delete
mv -f -- "$lock_tmp" "$cached_lock"
mv -f -- "$cached_img.tmp" "$cached_img"
rm -rf --one-file-system -- "$tree"
log "$LANGUAGE root filesystem built in $(($(date +%s) - start)) s"
install_outputs
