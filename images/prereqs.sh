#!/usr/bin/env bash
# Check (and, as root on a Debian host, install) what building and booting the image needs.
#
#   images/prereqs.sh binary|image|vm ...
#
# binary: a Debian Python (/usr/bin/python3 with venv), patchelf and binutils for staticx
# image:  apt-get and dpkg-deb to fetch and unpack the kernel, busybox and CA packages
# vm:     qemu-system-x86_64 and its iPXE ROMs, mosquitto for the boot test
# lint:   shellcheck for the image's shell scripts
#
# Every missing tool is named with the Debian package that provides it. As root with
# apt-get (CI) the packages are installed; otherwise it prints what to install and exits 3,
# which the tests turn into a skip. EDGERUN_NO_INSTALL=1 forbids installing.
set -euo pipefail

missing=()   # Debian packages to install
problems=()  # one line each: what is missing and its package

need_cmd() {  # need_cmd COMMAND PACKAGE [PATH...]
    local cmd=$1 pkg=$2 path
    shift 2
    if command -v "$cmd" >/dev/null 2>&1; then return 0; fi
    for path in "$@"; do
        if [ -x "$path" ]; then return 0; fi
    done
    missing+=("$pkg")
    problems+=("$cmd not found: apt-get install $pkg")
}

need_file() {  # need_file PATH PACKAGE
    if [ -e "$1" ]; then return 0; fi
    missing+=("$2")
    problems+=("$1 not found: apt-get install $2")
}

for group in "$@"; do
    case "$group" in
        binary)
            need_file /usr/bin/python3 python3
            # ensurepip is what Debian splits out into python3-venv
            if [ -x /usr/bin/python3 ] && ! /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null; then
                missing+=(python3-venv)
                problems+=("/usr/bin/python3 cannot create a venv: apt-get install python3-venv")
            fi
            need_cmd patchelf patchelf
            # images/binary/unpack.c, linked against zlib
            need_cmd gcc gcc
            need_file /usr/include/zlib.h zlib1g-dev
            need_cmd objcopy binutils
            need_cmd strip binutils
            need_cmd ldd libc-bin
            need_cmd flock util-linux
            ;;
        image)
            need_cmd apt-get apt
            need_cmd apt-cache apt
            need_cmd dpkg-deb dpkg
            need_cmd python3 python3
            need_cmd lz4 lz4  # the initramfs's compression (images/mkinitramfs.py)
            need_cmd zstd zstd  # its --compression zstd
            need_cmd flock util-linux
            ;;
        vm)
            need_cmd qemu-system-x86_64 qemu-system-x86
            need_file /usr/lib/ipxe/qemu/efi-virtio.rom ipxe-qemu
            need_cmd mosquitto mosquitto /usr/sbin/mosquitto
            ;;
        lint)
            need_cmd shellcheck shellcheck
            ;;
        *)
            echo "prereqs.sh: unknown group '$group' (binary, image, vm, lint)" >&2
            exit 2
            ;;
    esac
done

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1 && [ "${EDGERUN_NO_INSTALL:-0}" != 1 ]; then
    echo "prereqs.sh: installing ${packages[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >&2
    exit 0
fi

for line in "${problems[@]}"; do
    echo "build.sh: $line" >&2
done
echo "build.sh: as root: apt-get install ${packages[*]}" >&2
exit 3
