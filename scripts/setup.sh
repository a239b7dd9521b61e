#!/usr/bin/env bash
# Installs the system libraries relora builds against (Debian/Ubuntu): OpenBLAS, libzstd, pkg-config; and
# Open MPI, unless an MPI compiler wrapper (`mpicc`) is already on PATH (a cluster's own MPI is kept: the
# plugin must be built with the MPI the launcher runs). Then builds the MPI plugin
# (Kernels/build/librelora-mpi.so, `make -C Kernels mpi`); a failure there is a warning, since relora builds
# and runs in one process without it. Idempotent: a second run installs and rebuilds nothing.
# Swift 6 itself must already be on PATH (https://www.swift.org/install/).
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(libopenblas-dev libzstd-dev pkg-config)
command -v mpicc >/dev/null || packages+=(openmpi-bin libopenmpi-dev)
need=()
for pkg in "${packages[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "setup: installing ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v swift >/dev/null || { echo "setup: swift is not on PATH; install Swift 6 first" >&2; exit 1; }
mpi="no MPI plugin (no mpicc)"
if command -v mpicc >/dev/null; then
    log=$(mktemp)
    if make -s -C Kernels mpi >"$log" 2>&1; then
        mpi="MPI plugin Kernels/build/librelora-mpi.so"
    else
        echo "setup: warning: could not build the MPI plugin (make -C Kernels mpi); relora runs, but not under mpirun:" >&2
        tail -n 5 "$log" | sed 's/^/setup:   /' >&2
        mpi="no MPI plugin (build failed)"
    fi
    rm -f "$log"
fi
echo "setup: ok ($(swift --version 2>/dev/null | head -1); $mpi)"
