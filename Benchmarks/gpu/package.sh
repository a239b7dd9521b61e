#!/usr/bin/env bash
# Packages what a GPU machine without Swift needs to run Benchmarks/gpu/run.sh: release builds of `relora`
# and `relora-bench` with the Swift runtime linked in (--static-swift-stdlib), plus the shared libraries
# they load that a bare CUDA image may lack (OpenBLAS and its Fortran runtime, zstd), into dist/gpu/, and the
# same, stripped, as dist/gpu.tar.xz (~36 MB: what fits the device tool's 64 MiB carry; run.sh unpacks it).
# Run it here (where Swift is); carry dist/gpu.tar.xz to the GPU machine (device tool: carry ["dist/gpu.tar.xz"]).
set -euo pipefail
cd "$(dirname "$0")/../.."
swift build -c release --static-swift-stdlib --product relora
swift build -c release --static-swift-stdlib --product relora-bench
out=dist/gpu
rm -rf "$out" && mkdir -p "$out/lib"
bin=$(swift build -c release --show-bin-path)
cp "$bin/relora" "$bin/relora-bench" "$out/"
# Non-glibc dependencies of both binaries (ldd's resolved paths), so LD_LIBRARY_PATH=dist/gpu/lib finds them.
for exe in "$out/relora" "$out/relora-bench"; do
    ldd "$exe" | awk '/=> \// { print $3 }' | grep -Ev '/(libc|libm|libdl|libpthread|librt|ld-linux[^/]*)\.so' | while read -r lib; do
        cp -Ln "$lib" "$out/lib/" 2>/dev/null || true
    done
done
strip "$out/relora" "$out/relora-bench"
tar -C dist -cJf dist/gpu.tar.xz gpu
ls -la "$out" "$out/lib" dist/gpu.tar.xz
