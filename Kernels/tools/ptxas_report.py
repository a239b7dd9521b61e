#!/usr/bin/env python3
"""ptxas' register and spill report for libreloracuda.so, and the no-spill check.

Reads the `nvcc -Xptxas -v` output of every object (build/ptxas.log), prints one line per kernel and
architecture (registers, shared memory, stack frame, spill stores/loads) and exits non-zero when
  - a kernel named in HOT spills (any spill store or load, on any architecture), or
  - a kernel is in neither HOT nor COLD (a new kernel must be classified here).
A stack frame without spills (a local array indexed at run time) is reported but allowed.

usage: ptxas_report.py build/ptxas.log
"""
import re
import shutil
import subprocess
import sys

# Kernels on a training step's path: no spills allowed.
HOT = [
    "dequantize_kernel",
    "rmsnorm_forward_kernel",
    "rmsnorm_backward_dx_kernel",
    "rmsnorm_backward_dweight_kernel",
    "swiglu_forward_kernel",
    "swiglu_backward_kernel",
    "embedding_forward_kernel",
    "embedding_backward_kernel",
    # the embedding backward's radix sort of the token ids (every micro-batch)
    "sort_count_kernel",
    "sort_scan_kernel",
    "sort_scatter_kernel",
    "dropout_kernel",
    "adamw_kernel",
    "adamw8_kernel",
    # the optimizer step over every trained tensor (gradient_norm, adamw_multi, adamw_8bit_multi) and the
    # gradients' zeroing before it (zero_multi)
    "norm_partial_kernel",
    "norm_final_kernel",
    "norm_total_kernel",
    "adamw_multi_kernel",
    "adamw8_multi_kernel",
    "zero_multi_kernel",
    # the 8-bit moments' quantizer and dequantizer (checkpoints, conversions): small, held to no spills too
    "quantize8_kernel",
    "dequantize8_kernel",
    "reduce_partial_kernel",
    "reduce_final_kernel",
    "convert_kernel",
    "fill_kernel",
    "fill_uniform_kernel",
    "fill_normal_kernel",
    "axpy_kernel",
    "scale_kernel",
    "gemm_scalars_kernel",
    "rope_kernel",
    "attention_forward_kernel",
    "attention_backward_dq_kernel",
    "attention_backward_dkv_kernel",
    # the bf16 tensor-core attention (head_dim 64, 128)
    "attention_forward_mma_kernel",
    "attention_backward_dq_mma_kernel",
    "attention_backward_dkv_mma_kernel",
    "cross_entropy_kernel",
]
# Kernels that run once per restart or less (the merge, optimizer-state pruning, the merge report):
# reported, spills allowed.
COLD = [
    "quantize_kernel",
    "select_histogram_kernel",
    "select_scan_kernel",
    "select_zero_kernel",
    "prune_random_kernel",
    "changed_codes_kernel",
    "changed_codes_final_kernel",
    # Sampling's one-query attention over the KV cache (`relora sample`), never on a training step; on
    # sm_90 its bf16 instance spills 4 bytes (reported), which matters less than its untuned row reads.
    "attention_decode_kernel",
]


def demangle(names):
    if not names or not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def base_name(demangled):
    """`void relora::(anonymous namespace)::dequantize_kernel<relora::...>(...)` -> `dequantize_kernel`."""
    return short_name(demangled).split("<")[0].split("::")[-1].strip()


def short_name(demangled):
    """Drop namespaces and the parameter list, keep the template arguments."""
    text = re.sub(r"\b[A-Za-z_]\w*::", "", demangled.replace("(anonymous namespace)::", ""))
    depth, end = 0, len(text)
    for i, ch in enumerate(text):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            end = i
            break
    return text[:end].replace("void ", "", 1)


def parse(lines):
    kernels = {}  # (mangled, arch) -> dict
    entry, arch = None, None
    props_for = None
    for line in lines:
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if m:
            entry, arch = m.group(1), m.group(2)
            kernels.setdefault((entry, arch), {"regs": 0, "smem": 0, "stack": 0, "spill_st": 0, "spill_ld": 0})
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            props_for = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and props_for == entry and entry is not None:
            k = kernels[(entry, arch)]
            k["stack"], k["spill_st"], k["spill_ld"] = (int(g) for g in m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and entry is not None:
            k = kernels[(entry, arch)]
            k["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            k["smem"] = int(s.group(1)) if s else 0
    return kernels


def main():
    if len(sys.argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    with open(sys.argv[1]) as f:
        kernels = parse(f.read().splitlines())
    if not kernels:
        print("ptxas_report: no kernels in the log (was it built with -Xptxas -v?)")
        return 1
    names = demangle(sorted({k for k, _ in kernels}))
    failures = []
    rows = []
    for (mangled, arch), k in kernels.items():
        d = names[mangled]
        base = base_name(d)
        hot = base in HOT
        if not hot and base not in COLD:
            failures.append(f"{base}: not classified; add it to HOT or COLD in tools/ptxas_report.py")
        if hot and (k["spill_st"] or k["spill_ld"]):
            failures.append(f"{short_name(d)} on {arch} spills {k['spill_st']} bytes (stores), {k['spill_ld']} (loads)")
        rows.append((short_name(d), arch, k, "hot" if hot else "cold"))
    rows.sort(key=lambda r: (r[0], r[1]))
    width = max(len(r[0]) for r in rows)
    print(f"{'kernel':<{width}}  arch    regs  smem(B)  stack(B)  spill st/ld(B)  class")
    for name, arch, k, cls in rows:
        print(f"{name:<{width}}  {arch:<6} {k['regs']:>5}  {k['smem']:>7}  {k['stack']:>8}  "
              f"{k['spill_st']:>6}/{k['spill_ld']:<6}   {cls}")
    kernel_count = len({r[0] for r in rows})
    spills = sum(1 for r in rows if r[2]["spill_st"] or r[2]["spill_ld"])
    print(f"{kernel_count} kernels x {len({r[1] for r in rows})} architectures; {spills} with spills")
    if failures:
        print("FAILED:")
        for f in sorted(set(failures)):
            print("  " + f)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
