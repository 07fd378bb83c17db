# shellcheck shell=dash  # busybox ash
# Shared by /init and the helpers in /sbin (busybox sh).

log() {
    echo "edgerun: $*"
}

# cmdline_value NAME: the value of edgerun.NAME= on the kernel command line, or nothing.
cmdline_value() {
    local word value="" line
    read -r line </proc/cmdline  # a builtin: no process to start (slow under TCG)
    set -f
    # shellcheck disable=SC2086  # words
    for word in $line; do
        case "$word" in
            "edgerun.$1="*) value=${word#*=} ;;
        esac
    done
    set +f
    echo "$value"
}

# dmi_uuid_usable: whether the agent will name itself after the DMI product UUID
# (edgerun/agent/identity.py: present and not one of the placeholders firmware ships).
dmi_uuid_usable() {
    local uuid
    uuid=$(tr 'A-F' 'a-f' </sys/class/dmi/id/product_uuid 2>/dev/null) || return 1
    case "$uuid" in
        "" | 00000000-0000-0000-0000-000000000000 | ffffffff-ffff-ffff-ffff-ffffffffffff | \
            03000200-0400-0500-0006-000700080009 | 00020003-0004-0005-0006-000700080009)
            return 1 ;;
    esac
    return 0
}

# wait_for FILE SECONDS: until FILE exists, at most SECONDS.
wait_for() {
    local tenths=0
    while [ ! -e "$1" ] && [ "$tenths" -lt $(($2 * 10)) ]; do
        usleep 100000
        tenths=$((tenths + 1))
    done
}
