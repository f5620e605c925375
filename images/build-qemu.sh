#!/usr/bin/env bash
# Build exec-sandbox's own QEMU: qemu-system-x86_64 with the microvm machine, the virtio-mmio
# devices exec-sandbox uses and nothing else (no display, audio, USB host, PCI devices, network
# helpers or disassembler), from Debian's source of the installed qemu-system-x86 package, with
# Debian's patches (security fixes included).
#
# Usage: build-qemu.sh OUT_DIR
# Writes OUT_DIR/bin/qemu-system-x86_64 (stripped) and OUT_DIR/qemu.lock (the source version and
# the configure line). OUT_DIR must not exist yet.
#
# Inputs (environment):
#   SBX_BUILD_CACHE  cache directory (default: ${XDG_CACHE_HOME:-$HOME/.cache}/exec-sandbox/build)
# The source comes from the deb-src twin of the machine's own apt sources (no system change:
# a private sources list and package lists under the cache). Firmware (qboot's
# bios-microvm.bin) stays Debian's, found in /usr/share/qemu and /usr/share/seabios.
# This script may be run as `bash -c "$(cat build-qemu.sh)" build-qemu OUT_DIR`.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive LC_ALL=C

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'build-qemu: error: %s\n' "$*" >&2; exit 1; }

[ "$#" -eq 1 ] || die "usage: build-qemu.sh OUT_DIR"
[ "$(id -u)" -eq 0 ] || die "must run as root (installs packages with apt-get)"
OUT_DIR=$1
[ -e "$OUT_DIR" ] && die "$OUT_DIR exists"
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
# qemu-system-x86: the version to build, and its firmware.
ensure_packages qemu-system-x86 dpkg-dev xz-utils gcc libc6-dev make ninja-build meson \
    pkg-config python3 python3-venv flex bison libglib2.0-dev libpixman-1-dev libfdt-dev \
    libseccomp-dev zlib1g-dev binutils

VERSION=$(dpkg-query -W -f='${source:Version}' qemu-system-x86)
[ -n "$VERSION" ] || die "cannot read the installed qemu-system-x86's source version"

# For directory names: configure refuses colons (the epoch).
VDIR=$(printf '%s' "$VERSION" | tr -c 'A-Za-z0-9.+~-' '_')
qcache=$CACHE/qemu
mkdir -p "$qcache"
# One build at a time per cache directory.
exec 9>"$qcache/.lock"
flock 9

# --- source (Debian's, for the installed version) ------------------------------
# The deb-src twin of every `deb` source this machine uses, one-line and deb822 alike.
apt_dir=$qcache/apt
rm -rf -- "$apt_dir"
mkdir -p "$apt_dir/sources.list.d" "$apt_dir/lists/partial"
: >"$apt_dir/sources.list.d/deb-src.list"
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    sed -n 's/^[[:space:]]*deb[[:space:]]/deb-src /p' "$f" >>"$apt_dir/sources.list.d/deb-src.list"
done
for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    sed 's/^Types:.*/Types: deb-src/' "$f" >"$apt_dir/sources.list.d/$(basename -- "$f")"
done
apt_opts=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
    -o "Dir::State::Lists=$apt_dir/lists" -o "APT::Sandbox::User=root")

src=$qcache/src-$VDIR
for old in "$qcache"/src-* "$qcache"/obj-*; do
    [ -e "$old" ] || continue
    case $old in "$src" | "$qcache/obj-$VDIR") ;; *) log "removing stale $old"; rm -rf -- "$old" ;; esac
done
if [ ! -f "$src/.sbx-extracted" ]; then
    apt-get -qq "${apt_opts[@]}" update >&2
    if ! apt-cache "${apt_opts[@]}" showsrc qemu 2>/dev/null | grep -qxF "Version: $VERSION"; then
        # The archive keeps only its newest versions: an installed QEMU older than they are is
        # upgraded first (a security update either way), and that version is built.
        log "the archive has no source of qemu $VERSION: upgrading qemu-system-x86"
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends qemu-system-x86 >&2
        VERSION=$(dpkg-query -W -f='${source:Version}' qemu-system-x86)
        VDIR=$(printf '%s' "$VERSION" | tr -c 'A-Za-z0-9.+~-' '_')
        src=$qcache/src-$VDIR
        [ -f "$src/.sbx-extracted" ] && log "source $VERSION already unpacked"
    fi
fi
if [ ! -f "$src/.sbx-extracted" ]; then
    log "fetching Debian's qemu source $VERSION"
    dl=$qcache/download
    rm -rf -- "$dl" "$src"
    mkdir -p "$dl"
    (cd "$dl" && apt-get -qq "${apt_opts[@]}" source --download-only "qemu=$VERSION" >&2)
    log "unpacking and patching it"
    dpkg-source --no-check -x "$dl"/qemu_*.dsc "$src.tmp" >&2
    rm -rf -- "$dl"
    : >"$src.tmp/.sbx-extracted"
    mv -- "$src.tmp" "$src"
fi

# QEMU 7.2 does not link microvm without the PC machine: the ACPI stub and the microvm ACPI
# code both define pc_madt_cpu_entry. The stub's (empty) copy goes.
stub=$src/hw/acpi/acpi-x86-stub.c
if grep -q '^void pc_madt_cpu_entry' "$stub" && grep -q 'pc_madt_cpu_entry' "$src/hw/i386/acpi-common.c"; then
    sed -i '/^void pc_madt_cpu_entry/,/^}/d' "$stub"
fi

# The devices: microvm selects its own (serial, RTC, interrupt controllers, virtio-mmio).
cat >"$src/configs/devices/x86_64-softmmu/exec-sandbox.mak" <<'EOF'
CONFIG_MICROVM=y
CONFIG_VIRTIO_MMIO=y
CONFIG_VIRTIO_RNG=y
CONFIG_VIRTIO_BALLOON=y
CONFIG_VIRTIO_SERIAL=y
CONFIG_VIRTIO_NET=y
CONFIG_VIRTIO_BLK=y
CONFIG_SERIAL_ISA=y
EOF

# --- build --------------------------------------------------------------------
CONFIGURE=(--target-list=x86_64-softmmu --without-default-features --without-default-devices
    --with-devices-x86_64=exec-sandbox --enable-tcg --enable-kvm --enable-seccomp
    --enable-fdt=system --enable-malloc-trim --disable-docs --disable-tools
    --disable-install-blobs --firmwarepath=/usr/share/qemu:/usr/share/seabios
    "--extra-cflags=-fstack-protector-strong -Wformat -Werror=format-security"
    "--extra-ldflags=-Wl,-z,relro -Wl,-z,now")
obj=$qcache/obj-$VDIR
stamp=$obj/.sbx-configure
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${CONFIGURE[*]}" ]; then
    log "configuring (x86_64-softmmu, microvm and virtio-mmio devices only)"
    rm -rf -- "$obj"
    mkdir -p "$obj"
    (cd "$obj" && "$src/configure" --prefix=/nonexistent "${CONFIGURE[@]}" >&2)
    printf '%s' "${CONFIGURE[*]}" >"$stamp"
fi
log "compiling qemu-system-x86_64 (~4 min on 2 cores)"
ninja -C "$obj" -j "$(nproc)" qemu-system-x86_64 >&2

# Smoke test: the machine and every device exec-sandbox asks for are there.
devices=$("$obj/qemu-system-x86_64" -M microvm -device help)
for d in virtio-blk-device virtio-net-device virtio-serial-device virtserialport \
    virtio-rng-device virtio-balloon-device; do
    grep -q "\"$d\"" <<<"$devices" || die "the build lacks $d"
done

tmp=$OUT_DIR.tmp
rm -rf -- "$tmp"
mkdir -p "$tmp/bin"
strip -o "$tmp/bin/qemu-system-x86_64" "$obj/qemu-system-x86_64"
chmod 0755 "$tmp" "$tmp/bin" "$tmp/bin/qemu-system-x86_64"
{
    echo "qemu $VERSION (Debian source, Debian patches)"
    echo "configure ${CONFIGURE[*]}"
} >"$tmp/qemu.lock"
chmod 0644 "$tmp/qemu.lock"
mv -T -- "$tmp" "$OUT_DIR"
log "built $("$OUT_DIR/bin/qemu-system-x86_64" -version | head -n 1) into $OUT_DIR"
