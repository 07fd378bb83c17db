#!/usr/bin/env bash
# Build the discovery image: images/out/vmlinuz and images/out/initramfs.img (and
# images/out/floor.img, busybox alone on the same kernel: bench item 5's floor).
#
#   images/build-image.sh [--overlay DIR]...
#
# The kernel is Debian's (the candidate of linux-image-amd64, or
# EDGERUN_KERNEL_PACKAGE), busybox comes from busybox-static and the CA bundle
# from ca-certificates: their .deb files are fetched with `apt-get download`
# into images/out/cache and unpacked there, never installed, so this needs no
# root. The agent is images/out/edgerun-agent.root (built first when out of date): the
# same frozen agent as images/out/edgerun-agent, as PyInstaller's folder run in place,
# with the C libraries it needs.
# An --overlay directory is copied over the image's root last: an agent.toml in
# etc/edgerun/, a site CA, firmware in lib/firmware/.
#
# Nothing is rebuilt when no input changed (images/out/image.inputs).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=images/out
CACHE=$OUT/cache
PY=${EDGERUN_IMAGE_PYTHON:-python3}

say() { echo "build.sh image: $*" >&2; }

overlays=()
while [ $# -gt 0 ]; do
    case "$1" in
        --overlay) overlays+=("$(cd "$2" && pwd)"); shift 2 ;;
        --overlay=*) overlays+=("$(cd "${1#*=}" && pwd)"); shift ;;
        *) say "unknown argument '$1' (--overlay DIR)"; exit 2 ;;
    esac
done

images/prereqs.sh image || exit $?
mkdir -p "$OUT"
exec 9>"$OUT/.image.lock"  # one build at a time in this checkout
flock 9
images/build-binary.sh

# --- the Debian packages -----------------------------------------------------------------
if ! apt-cache show --no-all-versions linux-image-amd64 >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
        say "no Debian package lists yet: apt-get update"
        apt-get update -qq >&2
    else
        say "apt knows no linux-image-amd64: run 'apt-get update' as root first"
        exit 3
    fi
fi
# One apt-cache call per step: each one loads apt's whole cache (a second or more).
stanzas=$CACHE/apt-show.txt
mkdir -p "$CACHE/debs"
field() {  # field PACKAGE FIELD: from the candidate stanzas in $stanzas
    awk -v pkg="$1" -v key="$2:" '
        /^Package: / { this = ($2 == pkg) }
        this && $1 == key { sub(/^[^:]*: /, ""); print; exit }' "$stanzas"
}
apt-cache show --no-all-versions linux-image-amd64 busybox-static ca-certificates >"$stanzas"
kernel_pkg=${EDGERUN_KERNEL_PACKAGE:-$(field linux-image-amd64 Depends | sed 's/[ ,(].*//')}
if [ -z "$kernel_pkg" ]; then
    say "cannot tell which kernel linux-image-amd64 stands for (set EDGERUN_KERNEL_PACKAGE)"
    exit 2
fi
apt-cache show --no-all-versions "$kernel_pkg" >>"$stanzas"

fetch() {  # fetch PACKAGE: print the path of its candidate .deb, downloading it once
    local pkg=$1 sha dest tmp
    sha=$(field "$pkg" SHA256)
    if [ -z "$sha" ]; then
        say "apt knows no package $pkg (apt-get update?)"
        exit 2
    fi
    dest=$CACHE/debs/${pkg}_${sha:0:16}.deb
    if [ ! -f "$dest" ]; then
        say "downloading $pkg"
        tmp=$(mktemp -d "$CACHE/download.XXXXXX")
        (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2)
        mv "$tmp"/*.deb "$dest.part"
        rmdir "$tmp"
        if ! echo "$sha  $dest.part" | sha256sum --check --status; then
            say "$pkg: the download does not match the SHA256 apt expects"
            rm -f "$dest.part"
            exit 1
        fi
        mv "$dest.part" "$dest"
    fi
    echo "$dest"
}
kernel_deb=$(fetch "$kernel_pkg")
busybox_deb=$(fetch busybox-static)
ca_deb=$(fetch ca-certificates)
AGENT_ROOT=$OUT/edgerun-agent.root
agent_version=$("$AGENT_ROOT/usr/lib/edgerun-agent/edgerun-agent" --version | awk '{print $2}')
tree_hash() {  # tree_hash DIR: every file and symlink with its mode and contents
    (cd "$1" && find . \( -type f -o -type l \) | LC_ALL=C sort |
        while read -r f; do
            if [ -L "$f" ]; then echo "$f -> $(readlink "$f")"
            else echo "$f $(stat -c %A "$f") $(sha256sum <"$f")"; fi
        done)
}

# --- up to date? ---------------------------------------------------------------------------
hash=$(
    {
        sha256sum "$kernel_deb" "$busybox_deb" "$ca_deb" \
            images/build-image.sh images/mkinitramfs.py images/modules.txt | cut -d' ' -f1
        tree_hash "$AGENT_ROOT"
        tree_hash images/rootfs
        for dir in "${overlays[@]}"; do
            tree_hash "$dir"
        done
    } | sha256sum | cut -d' ' -f1
)
report() {
    local initramfs kernel
    initramfs=$(stat -c %s "$OUT/initramfs.img")
    kernel=$(stat -c %s "$OUT/vmlinuz")
    say "$OUT/initramfs.img: $(awk -v b="$initramfs" 'BEGIN { printf "%.1f MiB", b / 1048576 }') ($initramfs bytes)"
    say "$OUT/vmlinuz: $(awk -v b="$kernel" 'BEGIN { printf "%.1f MiB", b / 1048576 }') ($kernel_pkg)"
}
if [ -f "$OUT/initramfs.img" ] && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/floor.img" ] &&
    [ "$(cat "$OUT/image.inputs" 2>/dev/null)" = "$hash" ]; then
    say "up to date"
    report
    exit 0
fi

# --- unpack (the kernel tree is kept: it is the slow part) -----------------------------------
kernel_tree=$CACHE/$(basename "$kernel_deb" .deb)
if [ ! -f "$kernel_tree/.complete" ]; then
    say "unpacking $kernel_pkg"
    find "$CACHE" -maxdepth 1 -name 'linux-image-*' -type d -exec rm -rf {} +
    mkdir -p "$kernel_tree"
    dpkg-deb -x "$kernel_deb" "$kernel_tree"
    touch "$kernel_tree/.complete"
fi
work=$OUT/work/image
rm -rf "$work"
mkdir -p "$work/busybox" "$work/ca"
dpkg-deb -x "$busybox_deb" "$work/busybox"
dpkg-deb -x "$ca_deb" "$work/ca"

overlay_args=()
for dir in "${overlays[@]}"; do
    overlay_args+=(--overlay "$dir")
done
say "assembling the initramfs (kernel $kernel_pkg, agent $agent_version)"
"$PY" images/mkinitramfs.py --kernel-root "$kernel_tree" --busybox-root "$work/busybox" \
    --ca-root "$work/ca" --agent-root "$AGENT_ROOT" --agent-version "$agent_version" \
    --note "kernel_package=$kernel_pkg $(dpkg-deb -f "$kernel_deb" Version)" \
    --note "busybox=$(dpkg-deb -f "$busybox_deb" Version)" \
    --note "ca_certificates_package=$(dpkg-deb -f "$ca_deb" Version)" \
    "${overlay_args[@]}" --out "$OUT"
"$PY" images/mkinitramfs.py --floor "$OUT/floor.img" --busybox-root "$work/busybox"
echo "$hash" >"$OUT/image.inputs"
rm -rf "$work"
report
