#!/bin/sh
# TorchServe for `make bench-peers`, in a venv of its own, and the Java
# runtime it needs.
#
# TorchServe runs beside our server on the same model file (bench/peers.py).
# Its venv is kept apart from the dev venv: it takes another torch (the CPU
# wheel this machine has on disk) and TorchServe's own dependencies, from
# bench/torchserve/requirements.txt. Its frontend is Java (17 or newer for
# 0.12); when the machine has none as new, Debian's default headless runtime is
# installed, as the Makefile's `browser` target installs Chromium. The host's
# system Python and its apt sources are never touched.
#
#   tools/torchserve_env.sh VENV     build VENV from scratch; VENV/.installed marks a finished one
#
# make rebuilds it only when this script or the requirements change. PYTHON
# (default python3) makes the venv: it must be CPython 3.11, the only Python
# the on-disk torch wheel is for.
set -eu
PYTHON=${PYTHON:-python3}
PROJECT=$(realpath "$(dirname "$0")/..")
REQUIREMENTS=$PROJECT/bench/torchserve/requirements.txt
MIN_JAVA=17

java_major() {
    # `java -version` prints e.g. 'openjdk version "17.0.15" 2025-04-15' on stderr; 0 for no java.
    command -v java >/dev/null || { echo 0; return; }
    major=$(java -version 2>&1 | sed -n 's/.* version "\([0-9]*\).*/\1/p' | head -n 1)
    echo "${major:-0}"
}

if [ "$(java_major)" -lt "$MIN_JAVA" ]; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q default-jre-headless
    [ "$(java_major)" -ge "$MIN_JAVA" ] || {
        echo "TorchServe needs Java $MIN_JAVA or newer; this machine's is $(java_major)" >&2
        exit 1
    }
fi

venv=$1
# A venv's scripts name its path, so it is built where it stays; the stamp
# comes last, so an interrupted build is never taken for a finished one.
rm -rf "$venv"
"$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet -r "$REQUIREMENTS"
"$venv/bin/torchserve" --version
touch "$venv/.installed"
