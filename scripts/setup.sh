#!/usr/bin/env bash
# Installs the system libraries relora builds against (Debian/Ubuntu): OpenBLAS, libzstd, pkg-config.
# Swift 6 itself must already be on PATH (https://www.swift.org/install/).
set -euo pipefail
need=()
for pkg in libopenblas-dev libzstd-dev pkg-config; do
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
echo "setup: ok ($(swift --version 2>/dev/null | head -1))"
