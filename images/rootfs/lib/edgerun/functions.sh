# shellcheck shell=dash  # busybox ash
# Shared by /init and the helpers in /sbin (busybox sh).

log() {
    echo "edgerun: $*"
}

# kernel_params: set broker, node, net_wait and keep_modules from edgerun.NAME= on the
# kernel command line ("" when absent), with builtins only: no process to start, and
# processes cost tens of ms each under TCG while the agent starts.
# shellcheck disable=SC2034  # the variables are for the scripts that source this
kernel_params() {
    local word line
    broker="" node="" net_wait="" keep_modules=""
    read -r line </proc/cmdline
    set -f
    # shellcheck disable=SC2086  # words
    for word in $line; do
        case "$word" in
            edgerun.broker=*) broker=${word#*=} ;;
            edgerun.node=*) node=${word#*=} ;;
            edgerun.net_wait=*) net_wait=${word#*=} ;;
            edgerun.keep_modules=*) keep_modules=${word#*=} ;;
        esac
    done
    set +f
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
