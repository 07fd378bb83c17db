#!/usr/bin/env bash
# Build images/out/edgerun-agent: one static file, runs with no glibc at all; and
# images/out/edgerun-agent.root: the same agent unwrapped, for the discovery image.
#
# PyInstaller freezes `edgerun.agent.main:main` into one folder (stripped, bytecode
# at -OO, unused modules left out: images/binary/excludes.txt); staticx then packs
# that folder and the C libraries it still needs (glibc, ...) into a static ELF
# (images/binary/staticx_onedir.py). The image gets the folder itself, run in place,
# with those C libraries beside it (images/binary/image_folder.py).
#
# It is built from Debian's /usr/bin/python3 in its own venv (.venv-build):
# staticx refuses interpreters whose libraries carry an RPATH, such as pyenv's.
# EDGERUN_BUILD_PYTHON picks another interpreter. The output is rebuilt only
# when an input changed (images/out/edgerun-agent.inputs holds their hash).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=images/out
BIN=$OUT/edgerun-agent
BUILD_VENV=${EDGERUN_BUILD_VENV:-.venv-build}
BUILD_PYTHON=${EDGERUN_BUILD_PYTHON:-/usr/bin/python3}

say() { echo "build.sh binary: $*" >&2; }

images/prereqs.sh binary || exit $?

# One build at a time in this checkout (two test runs may ask at once).
mkdir -p "$OUT"
exec 9>"$OUT/.binary.lock"
flock 9

if ! "$BUILD_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    say "$BUILD_PYTHON is not Python 3.11 or newer (apt-get install python3, or set EDGERUN_BUILD_PYTHON)"
    exit 2
fi

# --- the build venv: the agent's own dependencies, PyInstaller and staticx ---------
requirements=$OUT/build-requirements.txt
mkdir -p "$OUT"
{
    "$BUILD_PYTHON" - <<'PY'
import tomllib
with open("pyproject.toml", "rb") as fh:
    print("\n".join(tomllib.load(fh)["project"]["dependencies"]))
PY
    grep -v '^#' images/binary/requirements.txt
} >"$requirements.new"
mv "$requirements.new" "$requirements"
stamp=$BUILD_VENV/.edgerun-requirements
if [ ! -x "$BUILD_VENV/bin/python" ] ||
    [ "$(readlink -f "$BUILD_VENV/bin/python")" != "$(readlink -f "$BUILD_PYTHON")" ]; then
    say "creating $BUILD_VENV from $BUILD_PYTHON"
    rm -rf "$BUILD_VENV"
    "$BUILD_PYTHON" -m venv "$BUILD_VENV"
fi
if ! cmp -s "$requirements" "$stamp"; then
    say "installing the build requirements into $BUILD_VENV"
    "$BUILD_VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$stamp"
fi

# --- is the binary up to date? -------------------------------------------------------
inputs_hash() {
    {
        "$BUILD_VENV/bin/python" -VV
        "$BUILD_VENV/bin/python" -m pip freeze --disable-pip-version-check
        find edgerun -path edgerun/scheduler -prune -o -path edgerun/bridge -prune -o -name '*.py' -type f -print | LC_ALL=C sort | xargs sha256sum
        sha256sum pyproject.toml images/build-binary.sh images/binary/*
    } | sha256sum | cut -d' ' -f1
}
hash=$(inputs_hash)
version=$("$BUILD_VENV/bin/python" -c 'import edgerun; print(edgerun.__version__)')
size_note() {
    local bytes
    bytes=$(stat -c %s "$BIN")
    say "$BIN: $(awk -v b="$bytes" 'BEGIN { printf "%.1f MiB", b / 1048576 }') ($bytes bytes)"
    bytes=$(du -sb "$ROOTFS" | cut -f1)
    say "$ROOTFS: $(awk -v b="$bytes" 'BEGIN { printf "%.1f MiB", b / 1048576 }') ($bytes bytes)"
}
ROOTFS=$OUT/edgerun-agent.root
if [ -x "$BIN" ] && [ -x "$ROOTFS/usr/lib/edgerun-agent/edgerun-agent" ] &&
    [ "$(cat "$BIN.inputs" 2>/dev/null)" = "$hash" ]; then
    say "up to date"
    size_note
    exit 0
fi

# --- PyInstaller, then staticx ---------------------------------------------------------
work=$OUT/work/binary
rm -rf "$work"
mkdir -p "$work"
say "freezing the agent $version with PyInstaller ($("$BUILD_VENV/bin/python" -V))"
# One folder, not --onefile: staticx below unpacks the whole folder at once, and the
# bootloader then runs Python in its own process. A one-file program inside staticx
# unpacked itself a second time at every start (15 MB more into /tmp) from a second
# process that stayed for the agent's lifetime (2 MiB of RSS). The options are in
# the spec file (images/binary/edgerun-agent.spec says why it is one).
folder=$work/dist/edgerun-agent
"$BUILD_VENV/bin/pyinstaller" --noconfirm --log-level WARN \
    --distpath "$work/dist" --workpath "$work/build" images/binary/edgerun-agent.spec
# What went in, for the tests and for anyone wondering about the size: the frozen
# modules, then the folder's files.
{
    "$BUILD_VENV/bin/pyi-archive_viewer" --recursive --brief "$folder/edgerun-agent"
    echo "Files beside the bootloader:"
    (cd "$folder" && find . -type f ! -name edgerun-agent -printf ' %P\n' | LC_ALL=C sort)
} >"$OUT/edgerun-agent.contents"

say "making it static with staticx"
# The library that inflates the start-up pack before the bootloader opens libpython
# (zlib, five times faster than staticx's xz: images/binary/unpack.c).
unpacker=$work/libedgerun-unpack.so
"${CC:-gcc}" -O2 -Wall -Wextra -Werror -fPIC -shared -o "$unpacker" images/binary/unpack.c -lz
"$BUILD_VENV/bin/python" images/binary/staticx_onedir.py "$folder" "$work/edgerun-agent" \
    --unpacker "$unpacker"
chmod 0755 "$work/edgerun-agent"
# The discovery image's copy: the folder unwrapped, run in place from the initramfs
# (compressed already), with glibc beside it: nothing is copied or decompressed at
# start, and there is no launcher process.
"$BUILD_VENV/bin/python" images/binary/image_folder.py "$folder" "$work/edgerun-agent.root"

got=$("$work/edgerun-agent" --version)
if [ "$got" != "edgerun-agent $version" ]; then
    say "the frozen binary says '$got' to --version, expected 'edgerun-agent $version'"
    exit 1
fi
got=$("$work/edgerun-agent.root/usr/lib/edgerun-agent/edgerun-agent" --version)
if [ "$got" != "edgerun-agent $version" ]; then
    say "the image's folder says '$got' to --version, expected 'edgerun-agent $version'"
    exit 1
fi
rm -rf "$ROOTFS" "$BIN.image"
mv -f "$work/edgerun-agent.root" "$ROOTFS"
mv -f "$work/edgerun-agent" "$BIN"
echo "$hash" >"$BIN.inputs"
rm -rf "$work"
say "built $got"
size_note
