#!/usr/bin/env bash
# Packages what a GPU machine without Swift needs to run Benchmarks/gpu/run.sh: release builds of `relora`
# and `relora-bench` with the Swift runtime linked in (--static-swift-stdlib), plus the shared libraries
# they load that a bare CUDA image may lack (OpenBLAS and its Fortran runtime, zstd, the C++ runtime), and
# BUNDLE.txt (what was packaged where), into dist/gpu/, and the same, stripped, as dist/gpu.tar.xz (~36 MB:
# what fits the device tool's 64 MiB carry; run.sh unpacks it).
# Run it here (where Swift is); carry dist/gpu.tar.xz to the GPU machine (device tool: carry ["dist/gpu.tar.xz"]).
set -euo pipefail
cd "$(dirname "$0")/../.."
swift build -c release --static-swift-stdlib --product relora
swift build -c release --static-swift-stdlib --product relora-bench
out=dist/gpu
rm -rf "$out" && mkdir -p "$out/lib"
bin=$(swift build -c release --show-bin-path)
cp "$bin/relora" "$bin/relora-bench" "$out/"
# Non-glibc dependencies of both binaries (ldd's resolved paths): run.sh points the Swift stages'
# LD_LIBRARY_PATH at them (and only those stages: the kernels are built and tested with the machine's own).
# That includes this machine's C++ runtime (libstdc++.so.6, libgcc_s.so.1), which run.sh adds only when it is
# newer than the GPU machine's: libreloracuda.so is built there by its g++ and needs at least that machine's
# libstdc++, the binaries need at least this one's, and the newer of the two serves both (see run.sh,
# swift_libraries).
for exe in "$out/relora" "$out/relora-bench"; do
    ldd "$exe" | awk '/=> \// { print $3 }' | grep -Ev '/(libc|libm|libdl|libpthread|librt|ld-linux[^/]*)\.so' | while read -r lib; do
        cp -Ln "$lib" "$out/lib/" 2>/dev/null || true
    done
done
strip "$out/relora" "$out/relora-bench"
# What the bundle is, for the GPU run's log (run.sh prints it in its bundle stage).
{
    echo "packaged $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' (with local changes)')"
    echo "on $(. /etc/os-release && echo "$PRETTY_NAME"), $(ldd --version | head -1), $(swift --version 2>&1 | head -1)"
    for lib in "$out"/lib/*; do
        level=$(grep -ao 'GLIBCXX_3\.4\.[0-9]*' "$lib" | sed 's/.*\.//' | sort -n | tail -1 || true)
        echo "lib/$(basename "$lib")${level:+ (GLIBCXX_3.4.$level)}"
    done
} > "$out/BUNDLE.txt"
cat "$out/BUNDLE.txt"
tar -C dist -cJf dist/gpu.tar.xz gpu
ls -la "$out" "$out/lib" dist/gpu.tar.xz
