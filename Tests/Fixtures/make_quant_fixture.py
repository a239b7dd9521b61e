"""Byte-compatibility fixture for relora's quantized formats (QuantFormatTests).

Quantizes fixed float32 matrices with the ecosystem's own quantizers and writes their bytes and their
dequantized values, so that the Swift tests can check relora's reference (Sources/CReLoRA/include/
relora_quant.h) against independent implementations without Python:

  q8_0, q4_0   the `gguf` package's numpy quantizers (gguf.quants.quantize / dequantize), which gguf-py
               documents as bit-exact with ggml's quantize_row_q8_0_ref / quantize_row_q4_0_ref
  nf4          bitsandbytes.functional.quantize_4bit(A, blocksize=64, quant_type="nf4",
               compress_statistics=False) and dequantize_4bit on the CPU (torch tensors)

Inputs: `random` [8, 256] (seeded normals, one scale per row, from 0.02 to 3e4) for every format, and
per format an `adversarial` [rows, 64] matrix whose rows are labelled in the metadata (key "fixture",
a JSON object: labels, block counts, seed, package versions) (all zeros, -0,
one huge value, subnormals, magnitude ties, values exactly at rounding ties and NF4 midpoints, scales
at both ends of the fp16 range, ...). Every row length is a multiple of 64, so a row is whole blocks in
every format and bitsandbytes' blocks over the flattened tensor are relora's per-row blocks.

Outputs, for F in q8_0, q4_0 and S in random, adversarial:
  F.S.bytes        U8 [rows, blocks * bytes_per_block]  the GGUF blocks (fp16 d little-endian, then codes)
  F.S.dequantized  F32 [rows, cols]                      gguf's dequantization of those bytes
and for nf4:
  nf4.S.codes      U8 [rows, cols / 2]                   bitsandbytes' packed codes (element 2i high nibble)
  nf4.S.absmax     F32 [rows, cols / 64]                 bitsandbytes' absmax, one per block of 64
  nf4.S.dequantized F32 [rows, cols]                     bitsandbytes' dequantize_4bit of those

Degenerate blocks (see relora_quant.h: fp16 scale rounds to zero; nf4 absmax < float32(1e-38)) are written
here exactly as the references produce them (their codes there are not meaningful: numpy may even warn
about casting NaN); the Swift test expects relora's canonical zero block for those and checks that the
references' values are zero (gguf) or below 1e-38 (bitsandbytes) too.

Run from the repository root (about 10 s on a CPU):
    python Tests/Fixtures/make_quant_fixture.py
It is deterministic: the same package versions write a byte-identical file.
"""

import json
import os
import sys

import numpy as np
import torch
from safetensors.numpy import save_file

import gguf
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants
import bitsandbytes
import bitsandbytes.functional as bnbf

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quant_reference.safetensors")
SEED = 8_2024
F32 = np.float32


def next_up(x):
    return np.nextafter(F32(x), F32(np.inf), dtype=F32)


def next_down(x):
    return np.nextafter(F32(x), F32(-np.inf), dtype=F32)


def block(values, fill_rng=None, fill_scale=0.0, size=64):
    """A block of `size` float32 values: `values` first, then fill (zeros, or small normals)."""
    out = np.zeros(size, dtype=F32)
    v = np.asarray(values, dtype=F32)
    assert v.size <= size, v.size
    out[: v.size] = v
    if fill_rng is not None and v.size < size:
        out[v.size:] = (fill_rng.standard_normal(size - v.size) * fill_scale).astype(F32)
    return out


def common_rows(rng):
    """Adversarial rows (64 values) that every format sees."""
    sub = F32(2.0**-149)  # smallest subnormal
    rows = []
    rows.append(("zeros", np.zeros(64, dtype=F32)))
    rows.append(("negative zeros", np.full(64, -0.0, dtype=F32)))
    rows.append(("-0, +0 alternating (first -0)", np.array([-0.0, 0.0] * 32, dtype=F32)))
    rows.append(("+0, -0 alternating (first +0)", np.array([0.0, -0.0] * 32, dtype=F32)))
    huge = block([], rng, 0.01)
    huge[5] = 4.0e5
    rows.append(("one huge value 4e5 among N(0, 0.01^2)", huge))
    huge2 = block([], rng, 1.0)
    huge2[40] = -4.0e5
    rows.append(("one huge value -4e5 among N(0, 1)", huge2))
    ks = rng.integers(-(2**20), 2**20, size=64)
    rows.append(("subnormals only (|x| < 2^-126)", (ks.astype(np.float64) * 2.0**-149).astype(F32)))
    mixed = (rng.integers(-(2**22), 2**22, size=64).astype(np.float64) * 2.0**-149).astype(F32)
    mixed[0], mixed[33] = F32(1.0), F32(-1.0)
    rows.append(("normal +-1 among subnormals", mixed))
    tiny = np.zeros(64, dtype=F32)
    tiny[3], tiny[50] = sub, -sub
    rows.append(("+-2^-149 among zeros", tiny))
    tie = block([], rng, 0.3)
    tie[2], tie[9], tie[40], tie[47] = 3.0, -3.0, -3.0, 3.0
    rows.append(("magnitude ties: +3 before -3 (first 32), -3 before +3 (last 32)", tie))
    rows.append(("constant 0.7", np.full(64, 0.7, dtype=F32)))
    pw = np.array([(-1.0) ** k * 2.0**e for k, e in enumerate(range(-45, 19))], dtype=F32)
    rows.append(("+-2^k for k in [-45, 18]", pw))
    return rows


def q8_0_rows(rng):
    rows = []
    # d = 1 exactly: codes are round-half-away-from-zero of x itself.
    b0 = [127.0] + [k + 0.5 for k in range(-16, 15)]
    b1 = [-127.0] + [s * (k + 0.5) for k in (126, 125, 100, 64, 3, 2, 1, 0) for s in (1, -1)] + [0.49999997, -0.49999997, 1.5000001, -2.4999998]
    rows.append(("q8_0 ties at d = 1 (x = k + 0.5)", block(b0, size=32).tolist() + block(b1, size=32).tolist()))
    # d = 0.125: x * id = 8x is exact, ties again.
    b = [127 * 0.125] + [(k + 0.5) * 0.125 for k in range(-31, 32, 2)]
    rows.append(("q8_0 ties at d = 0.125", block(b)))
    # The fp16 range of the scale.
    top = block([], rng, 1e6)
    top[0], top[32] = 65504.0 * 127, -65519.0 * 127  # d = 65504 exactly; d = 65519 rounds down to 65504
    rows.append(("q8_0 scale at the fp16 maximum (65504; 65519 rounds down)", top))
    sm = block([], rng, 2.0**-26)
    sm[0] = 127 * 2.0**-24   # d = 2^-24, the smallest fp16 subnormal
    sm[32] = 127 * 2.0**-20  # d = 2^-20, a larger subnormal
    rows.append(("q8_0 subnormal fp16 scales 2^-24, 2^-20", sm))
    up = block([], rng, 2.0**-27)
    up[1] = 127 * 1.5 * 2.0**-25   # d = 1.5 * 2^-25 rounds up to 2^-24
    up[40] = -127 * 2.0**-25       # d = 2^-25: ties to even, fp16 zero -> degenerate
    rows.append(("q8_0 scale 1.5*2^-25 (rounds up to 2^-24) | scale 2^-25 (rounds to 0: degenerate)", up))
    rows.append(("q8_0 |x| ~ 1e-7: degenerate (fp16 scale 0)", block([], rng, 1e-7)))
    return rows


def q4_0_rows(rng):
    rows = []
    # max = -8 -> d = 1, id = 1: codes = trunc(x + 8.5) = round half up of x + 8.
    b0 = [-8.0] + [k - 0.5 for k in range(-7, 9)] + [float(k) for k in range(-7, 8)]
    # max = +8 -> d = -1, id = -1.
    b1 = [8.0] + [k - 0.5 for k in range(-7, 9)] + [float(k) + 0.49999997 for k in range(-7, 8)]
    rows.append(("q4_0 ties at d = 1 | d = -1", block(b0, size=32).tolist() + block(b1, size=32).tolist()))
    b = [-2.0] + [(k - 0.5) * 0.25 for k in range(-7, 9)] + [next_up((k - 0.5) * 0.25) for k in range(-7, 8)]
    rows.append(("q4_0 ties at d = 0.25", block(b)))
    top = block([], rng, 1e5)
    top[0], top[32] = 65504.0 * 8, -524159.0  # d = -65504; d = 65519.875 rounds down to 65504
    rows.append(("q4_0 scale at the fp16 maximum", top))
    sm = block([], rng, 2.0**-28)
    sm[0] = 8 * 2.0**-24     # d = -2^-24
    sm[32] = -8 * 2.0**-20   # d = +2^-20
    rows.append(("q4_0 subnormal fp16 scales -2^-24, +2^-20", sm))
    dg = block([], rng, 2.0**-29)
    dg[0] = 8 * 2.0**-25     # d = -2^-25 -> fp16 -0: degenerate (gguf writes 0x8000 too)
    dg[32] = -8 * 2.0**-25   # d = +2^-25 -> fp16 +0: degenerate (gguf writes 0x0000, relora 0x8000)
    rows.append(("q4_0 scales +-2^-25 (round to +-0: degenerate)", dg))
    return rows


def nf4_rows(rng):
    code = bnbf.get_4bit_type("nf4", device="cpu").numpy().astype(F32)
    mids = ((code[:-1] + code[1:]) / F32(2)).astype(F32)
    rows = []

    def at_midpoints(scale):
        s = F32(scale)
        vals = [s]  # absmax first
        vals += [F32(m) * s for m in mids]
        vals += [next_up(F32(m) * s) for m in mids]
        vals += [next_down(F32(m) * s) for m in mids]
        vals += [F32(c) * s for c in code[1:-1]]
        return block(vals)

    rows.append(("nf4 absmax 1: every midpoint, its float neighbours, every code value", at_midpoints(1.0)))
    rows.append(("nf4 absmax 2: the same, scaled exactly", at_midpoints(2.0)))
    rows.append(("nf4 absmax 3: the same, 1/3 inexact", at_midpoints(3.0)))
    neg = at_midpoints(0.7)
    neg[0] = F32(-0.7)
    rows.append(("nf4 absmax from a negative value (-0.7)", neg))
    big = block([], rng, 1e37)
    big[7] = np.finfo(F32).max
    rows.append(("nf4 absmax = FLT_MAX", big))
    thr = F32(1e-38)  # bitsandbytes' clamp, a subnormal
    t = (rng.integers(-7_000_000, 7_000_000, size=64).astype(np.float64) * 2.0**-149).astype(F32)
    t[0] = thr
    rows.append(("nf4 absmax = float32(1e-38) exactly (not degenerate), subnormals", t))
    t2 = t.copy()
    t2[0] = next_down(thr)
    t2[1:] = np.clip(t2[1:], -next_down(thr), next_down(thr))
    rows.append(("nf4 absmax just below 1e-38: degenerate", t2))
    fm = block([], rng, 2.0**-128)
    fm[63] = F32(2.0**-126)
    rows.append(("nf4 absmax = FLT_MIN (2^-126)", fm))
    return rows


def gguf_pair(x, qtype):
    with np.errstate(all="ignore"):
        q = gguf_quants.quantize(x, qtype)
        d = gguf_quants.dequantize(q, qtype).astype(F32)
    assert q.dtype == np.uint8 and d.shape == x.shape
    return q, d


def bnb_triple(x):
    t = torch.from_numpy(x.copy())
    packed, state = bnbf.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=False)
    deq = bnbf.dequantize_4bit(packed, state, blocksize=64, quant_type="nf4")
    rows, cols = x.shape
    codes = packed.numpy().reshape(rows, cols // 2).copy()
    absmax = state.absmax.numpy().astype(F32).reshape(rows, cols // 64).copy()
    return codes, absmax, deq.numpy().astype(F32)


def main():
    rng = np.random.default_rng(SEED)
    scales = np.array([0.02, 0.02, 0.1, 1.0, 1.0, 10.0, 300.0, 3.0e4], dtype=np.float64)
    random = (rng.standard_normal((8, 256)) * scales[:, None]).astype(F32)

    tensors = {"random": random}
    labels = {}
    counts = {}

    common = common_rows(rng)
    specific = {"q8_0": q8_0_rows(rng), "q4_0": q4_0_rows(rng), "nf4": nf4_rows(rng)}
    for fmt in ("q8_0", "q4_0", "nf4"):
        rows = common + specific[fmt]
        adv = np.stack([np.asarray(r, dtype=F32) for _, r in rows]).astype(F32)
        assert adv.shape[1] == 64 and np.all(np.isfinite(adv))
        tensors[f"{fmt}.adversarial"] = adv
        labels[fmt] = [name for name, _ in rows]
        for part, x in (("random", random), ("adversarial", adv)):
            if fmt == "nf4":
                codes, absmax, deq = bnb_triple(x)
                tensors[f"nf4.{part}.codes"] = codes
                tensors[f"nf4.{part}.absmax"] = absmax
                tensors[f"nf4.{part}.dequantized"] = deq
                degenerate = int(np.sum(absmax < F32(1e-38)))
                blocks = absmax.size
            else:
                qtype = GGMLQuantizationType.Q8_0 if fmt == "q8_0" else GGMLQuantizationType.Q4_0
                q, deq = gguf_pair(x, qtype)
                tensors[f"{fmt}.{part}.bytes"] = q
                tensors[f"{fmt}.{part}.dequantized"] = deq
                bpb = 34 if fmt == "q8_0" else 18
                d = q.reshape(-1, bpb)[:, :2].copy().view(np.uint16).reshape(-1)
                degenerate = int(np.sum((d & 0x7FFF) == 0))
                blocks = d.size
                assert not np.any((d & 0x7FFF) == 0x7C00), f"{fmt} {part}: an fp16 scale overflowed"
            counts[f"{fmt}.{part}"] = {"blocks": blocks, "degenerate": degenerate}
            if part == "random":
                assert degenerate == 0, f"{fmt}: random data must have no degenerate block"

    # The rounding claims of relora_quant.h, checked on the packages themselves.
    halves = np.array([0.5, 1.5, 2.5, -0.5, -2.5], dtype=F32)
    assert np.array_equal(gguf_quants.np_roundf(halves), np.array([1, 2, 3, -1, -3], dtype=F32))
    assert not np.array_equal(np.round(halves), gguf_quants.np_roundf(halves))

    # One metadata key: safetensors writes several in hash order, which would make re-runs differ.
    metadata = {"fixture": json.dumps({
        "format": "relora quant reference v1",
        "seed": SEED,
        "labels": labels,
        "counts": counts,
        "versions": {
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "gguf": gguf_version(),
            "torch": torch.__version__,
            "bitsandbytes": bitsandbytes.__version__,
        },
    }, sort_keys=True)}
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, OUT, metadata=metadata)
    size = os.path.getsize(OUT)
    print(f"wrote {OUT} ({size / 1024:.1f} KiB)")
    for k, v in counts.items():
        print(f"  {k}: {v['blocks']} blocks, {v['degenerate']} degenerate")


def gguf_version():
    from importlib.metadata import version
    return version("gguf")


if __name__ == "__main__":
    main()
