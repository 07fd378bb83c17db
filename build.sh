#!/usr/bin/env bash
# The one entry point: set-up, tests, demo, binary, image, benchmarks.
#   ./build.sh setup   create .venv and install edgerun with its test and dev extras
#   ./build.sh test    lint (ruff, mypy) and run every test
#   ./build.sh lint    ruff and mypy only
#   ./build.sh demo    embedded broker, scheduler and one agent: run example tasks
#   ./build.sh binary  the agent as one static file: images/out/edgerun-agent
#   ./build.sh image   the discovery image: images/out/vmlinuz and initramfs.img
#   ./build.sh bench   benchmarks against the alternatives (--quick, or items: bench 1 3)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${EDGERUN_VENV:-.venv}
PY="$VENV/bin/python"

pick_python() {
    for candidate in python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"; return
        fi
    done
    echo "build.sh: Python 3.11 or newer is needed (apt-get install python3)" >&2
    exit 2
}

setup() {
    if [ ! -x "$PY" ]; then
        "$(pick_python)" -m venv "$VENV"
    fi
    stamp="$VENV/.edgerun-installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        "$PY" -m pip install --quiet --disable-pip-version-check --upgrade pip
        "$PY" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
        touch "$stamp"
    fi
}

brokers_hint() {
    command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] ||
        echo "build.sh: mosquitto not found; tests fall back to 127.0.0.1:1883 (apt-get install mosquitto)" >&2
}

lint() {
    "$VENV/bin/ruff" check .
    "$VENV/bin/mypy"
}

cmd=${1:-help}
shift || true
case "$cmd" in
    setup) setup ;;
    lint) setup; lint ;;
    demo) setup; "$PY" -m edgerun.scheduler.demo "$@" ;;
    binary) images/build-binary.sh "$@" ;;
    image) images/build-image.sh "$@" ;;
    bench)
        setup
        "$PY" -c 'import matplotlib' 2>/dev/null ||
            "$PY" -m pip install --quiet --disable-pip-version-check -e ".[bench]"
        "$PY" bench/run.py "$@"
        ;;
    test)
        setup
        brokers_hint
        lint
        "$PY" -m pytest "$@"
        ;;
    *)
        sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
        [ "$cmd" = help ] || exit 2
        ;;
esac
