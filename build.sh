#!/usr/bin/env bash
# The one entry point: set-up, tests, demo, binary, image, benchmarks.
#   ./build.sh setup   create .venv and install edgerun with its test and dev extras
#   ./build.sh test    lint (ruff, mypy) and run every test (test --quick: the fast ones)
#   ./build.sh lint    ruff and mypy only
#   ./build.sh demo    embedded broker, scheduler and one agent: run example tasks; prints
#                      the console's URL and token (demo --keep: leave it running)
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

browser() {
    # the console's browser tests drive Debian's chromium through Playwright (never
    # `playwright install`, which downloads a browser); CI runs as root and gets it here
    command -v chromium >/dev/null 2>&1 && return
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "build.sh: installing chromium for the console's browser tests" >&2
        apt-get install -y -q chromium >/dev/null 2>&1 ||
            { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } ||
            echo "build.sh: could not install chromium; the browser tests are skipped" >&2
    else
        echo "build.sh: chromium not found; the browser tests are skipped (apt-get install chromium)" >&2
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
        # --quick: lint and the tests not marked slow (tests/conftest.py), a developer's loop
        setup
        brokers_hint
        args=() quick=()
        for arg in "$@"; do
            if [ "$arg" = --quick ]; then quick=(-m "not slow"); else args+=("$arg"); fi
        done
        [ ${#quick[@]} -gt 0 ] || browser  # the browser tests are slow ones
        lint
        "$PY" -m pytest "${quick[@]}" "${args[@]}"
        ;;
    *)
        sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
        [ "$cmd" = help ] || exit 2
        ;;
esac
