#!/bin/sh
# Run a command in a new network namespace whose only interface is loopback.
#
# The test suite sends hostile URLs (169.254.169.254, 10.0.0.1, public
# addresses) at the service. In here a bug can at worst reach this
# namespace's own loopback: no packet can leave the machine. The namespace
# also gets one "public" address on loopback, PUBLIC_TEST_ADDRESS, so tests
# can run a host that the production URL policy accepts, and a name for it
# that the system resolver answers from /etc/hosts (an internationalised
# one, in its IDNA form), through a private mount namespace, so the real
# /etc/hosts is untouched. Keep both in step with tests/support/network.py.
#
# Usage: tools/isolated_network.sh COMMAND [ARGS...]
set -eu
PUBLIC_TEST_ADDRESS=11.22.33.44
PUBLIC_TEST_NAME=xn--bcher-kva.example # bücher.example

if [ "${1:-}" != "--inside" ]; then
    if [ "$(id -u)" = 0 ]; then
        exec unshare --net --mount -- "$0" --inside "$@"
    fi
    exec unshare --net --mount --map-root-user -- "$0" --inside "$@"
fi
shift
ip link set lo up
ip address add "$PUBLIC_TEST_ADDRESS/32" dev lo
hosts=$(mktemp)
{ cat /etc/hosts; echo "$PUBLIC_TEST_ADDRESS $PUBLIC_TEST_NAME"; } >"$hosts"
mount --bind "$hosts" /etc/hosts
rm "$hosts"
exec "$@"
