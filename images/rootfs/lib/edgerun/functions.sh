# shellcheck shell=dash  # busybox ash
# Shared by /init and the helpers in /sbin (busybox sh).

log() {
    echo "edgerun: $*"
}

# cmdline_value NAME: the value of edgerun.NAME= on the kernel command line, or nothing.
cmdline_value() {
    local word value=""
    set -f
    # shellcheck disable=SC2013  # words, not lines
    for word in $(cat /proc/cmdline); do
        case "$word" in
            "edgerun.$1="*) value=${word#*=} ;;
        esac
    done
    set +f
    echo "$value"
}
