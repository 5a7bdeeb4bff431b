#!/bin/sh
# A Debian 13 "trixie" root under build/: CPython 3.13 for packaging and for
# the Lambda simulation, on a machine whose own Python is older.
#
# Lambda's python3.13 runtime is CPython 3.13 on Amazon Linux 2023. Chalice
# takes the runtime and its wheels from the Python that runs it, so packaging
# for python3.13 needs a real 3.13, and simulating the package needs one to
# import it. Debian 13 ships exactly that (its glibc, 2.41, is newer than
# Amazon Linux 2023's 2.34, so the glibc gate in tools/runtime_gate.py, not
# this root, is what proves the libraries load there).
#
#   tools/debian_root.sh build ROOT         debootstrap the root (about a minute, 270 MB),
#                                           once: ROOT/.complete marks a finished one
#   tools/debian_root.sh run ROOT CMD...    run CMD inside it, in the current directory
#
# `run` enters a private mount namespace, so nothing it mounts outlives CMD or
# is seen by the host: /proc, /dev, the host's DNS configuration and CA bundle
# (pip reaches PyPI through a TLS proxy whose CA only the host's bundle
# carries), and this project, /tmp and $TMPDIR, each at its own path, so a
# path means the same inside and out; CMD starts in the current directory,
# which must be in one of those. CMD keeps the caller's environment and network
# namespace (the tests run it inside their loopback-only one).
#
# Both need root (debootstrap, mount, chroot); a machine with Python 3.12+ of
# its own can skip all this with DEPLOY_PYTHON (see the Makefile). The host's
# apt sources and system Python are never touched; debootstrap itself comes
# from Debian's packages when it is missing.
set -eu
# chroot and debootstrap live in sbin, which callers with a minimal PATH (the simulation) lack.
PATH="$PATH:/usr/sbin:/sbin"

SUITE=trixie
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=python3,python3-venv,ca-certificates
HOST_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
PROJECT=$(realpath "$(dirname "$0")/..")

build() {
    root=$1
    [ -f "$root/.complete" ] && return 0
    command -v debootstrap >/dev/null || {
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap
    }
    partial="$root.partial"
    rm -rf "$partial"
    mkdir -p "$(dirname "$root")"
    echo "debootstrap $SUITE ($PACKAGES) from $MIRROR into $root"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$partial" "$MIRROR" >"$partial.log" 2>&1 || {
        tail -20 "$partial.log" >&2
        exit 1
    }
    rm -f "$partial.log"
    # A record of what is inside, for the closing notes and for a later diff.
    chroot "$partial" dpkg-query -W -f '${Package} ${Version}\n' libc6 python3.13 >"$partial/.versions"
    touch "$partial/.complete"
    rm -rf "$root"
    mv "$partial" "$root"
}

run() {
    root=$(realpath "$1")
    shift
    [ -f "$root/.complete" ] || { echo "$root is not a finished root: run '$0 build $root'" >&2; exit 1; }
    exec unshare --mount --propagation private -- sh -eu -c '
        root=$1 ca=$2
        shift 2
        mount --rbind /proc "$root/proc"
        mount --rbind /dev "$root/dev"
        mount --bind /etc/resolv.conf "$root/etc/resolv.conf"
        if [ -f "$ca" ]; then mount --bind "$ca" "$root/etc/ssl/certs/ca-certificates.crt"; fi
        while [ "$1" != -- ]; do
            mkdir -p "$root$1"
            mount --bind "$1" "$root$1"
            shift
        done
        shift
        exec chroot "$root" /bin/sh -c "cd \"\$0\" && exec \"\$@\"" "$PWD" "$@"
    ' sh "$root" "$HOST_CA_BUNDLE" /tmp "$(realpath "${TMPDIR:-/tmp}")" "$PROJECT" -- "$@"
}

case "${1:-}" in
build) build "$2" ;;
run) shift; run "$@" ;;
*) echo "usage: $0 build ROOT | run ROOT COMMAND [ARGS...]" >&2; exit 2 ;;
esac
