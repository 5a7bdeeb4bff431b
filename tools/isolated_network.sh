#!/bin/sh
# Run a command in a new network namespace whose only interface is loopback.
#
# The test suite sends hostile URLs (169.254.169.254, 10.0.0.1, public
# addresses) at the service. In here a bug can at worst reach this
# namespace's own loopback: no packet can leave the machine. The namespace
# also gets one "public" address on loopback, PUBLIC_TEST_ADDRESS, so tests
# can run a host that the production URL policy accepts (keep it in step with
# tests/support/network.py).
#
# Usage: tools/isolated_network.sh COMMAND [ARGS...]
set -eu
PUBLIC_TEST_ADDRESS=11.22.33.44

if [ "${1:-}" != "--inside" ]; then
    if [ "$(id -u)" = 0 ]; then
        exec unshare --net -- "$0" --inside "$@"
    fi
    exec unshare --net --map-root-user -- "$0" --inside "$@"
fi
shift
ip link set lo up
ip address add "$PUBLIC_TEST_ADDRESS/32" dev lo
exec "$@"
