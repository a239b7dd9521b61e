// Warp-level tensor-core operations and asynchronous copies, one spelling for both builds: inline PTX under
// nvcc, the emulation's collectives (emu/cuda_emu.cpp) under a host compiler. The kernels that use them
// (attention_mma.cu) are the same source in both.
//
// Fragments of mma.m16n8k16 with bf16 inputs and f32 accumulators (the PTX ISA's layouts; the emulation
// implements exactly these, documented in cuda_emu.cpp). With g = lane >> 2 and t = lane % 4:
//   A (16 x 16, row-major)  uint32_t a[4]: a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t, 2t+1],
//                                          a[2] = A[g][2t+8, 2t+9], a[3] = A[g+8][2t+8, 2t+9]
//   B (16 x 8, k x n)       uint32_t b[2]: b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g]
//   C, D (16 x 8, f32)      float c[4]:    c[0], c[1] = C[g][2t, 2t+1], c[2], c[3] = C[g+8][2t, 2t+1]
// A register holds two bf16, the lower-indexed element in its low 16 bits. So the accumulators of two
// adjacent n-tiles (16 columns) of a product are, packed, the A fragment of those 16 columns as the k slice
// of the next product (the flash-attention trick that keeps P and dS in registers): a_from_c below.
#ifndef RELORA_MMA_CUH
#define RELORA_MMA_CUH

#include "relora_cuda.cuh"

// Loops over small per-thread arrays are unrolled so the arrays stay in registers (nvcc; g++ ignores it).
#if !defined(RELORA_UNROLL)
#if defined(__CUDACC__)
#define RELORA_UNROLL _Pragma("unroll")
#else
#define RELORA_UNROLL
#endif
#endif

namespace relora {

// d += a b (f32 accumulators, bf16 products): mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32.
__device__ __forceinline__ void mma_bf16_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDACC__)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    const uint32_t b[2] = {b0, b1};
    ::relora_emu::relora_emu_mma_m16n8k16_bf16(d, a, b, d);
#endif
}

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16: lanes 8m .. 8m + 7 give the 16-byte-aligned addresses of
// rows 0..7 of matrix m (8 bf16 each); r[m] is lane's fragment of matrix m: row lane / 4, columns 2 (lane % 4)
// and + 1 (without .trans), or the same of the transposed matrix (with .trans).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const __nv_bfloat16 *row) {
#if defined(__CUDACC__)
    const unsigned int address = (unsigned int)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
#else
    ::relora_emu::relora_emu_ldmatrix(r, 4, 0, row);
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const __nv_bfloat16 *row) {
#if defined(__CUDACC__)
    const unsigned int address = (unsigned int)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
#else
    ::relora_emu::relora_emu_ldmatrix(r, 4, 1, row);
#endif
}

// Two floats rounded to bf16 (nearest even) in one register, lo in the low half: cvt.rn.bf16x2.f32 (whose
// first source goes to the high half).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
#if defined(__CUDACC__)
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(lo)) |
           ((uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(hi)) << 16);
#endif
}

// The A fragments of the 16-column slices of a 16 x (8 N8) accumulator tile, rounded to bf16.
template <int N8>
__device__ __forceinline__ void a_from_c(uint32_t (&a)[N8 / 2][4], const float (&c)[N8][4]) {
    static_assert(N8 % 2 == 0, "whole 16-column slices");
RELORA_UNROLL
    for (int kk = 0; kk < N8 / 2; ++kk) {
        a[kk][0] = pack_bf16x2(c[2 * kk][0], c[2 * kk][1]);
        a[kk][1] = pack_bf16x2(c[2 * kk][2], c[2 * kk][3]);
        a[kk][2] = pack_bf16x2(c[2 * kk + 1][0], c[2 * kk + 1][1]);
        a[kk][3] = pack_bf16x2(c[2 * kk + 1][2], c[2 * kk + 1][3]);
    }
}

// 16 bytes from global to shared memory, asynchronously (cp.async.cg: through L2 only); valid == false
// zero-fills the destination instead (src must still be a mapped address: it is not read). Both addresses
// 16-byte aligned; the destination in dynamic shared memory.
__device__ __forceinline__ void cp_async_16(void *dst, const void *src, bool valid) {
#if defined(__CUDACC__)
    const unsigned int address = (unsigned int)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
#else
    ::relora_emu::relora_emu_cp_async(dst, src, 16, valid ? 16u : 0u);
#endif
}

// Closes the thread's current group of cp.async copies.
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDACC__)
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#else
    ::relora_emu::relora_emu_cp_async_commit();
#endif
}

// Waits until at most `Pending` of the thread's committed groups are still in flight. Other threads see the
// data only after a barrier that follows their writers' waits.
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDACC__)
    asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
#else
    ::relora_emu::relora_emu_cp_async_wait(Pending);
#endif
}

// 8 consecutive bf16 (16 bytes, 16-byte aligned) widened to f32.
__device__ __forceinline__ void load_bf16x8(float (&x)[8], const __nv_bfloat16 *p) {
#if defined(__CUDACC__)
    const uint4 v = *reinterpret_cast<const uint4 *>(p);
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#else
    uint32_t w[4];
    memcpy(w, p, sizeof w);
#endif
RELORA_UNROLL
    for (int i = 0; i < 4; ++i) {
        x[2 * i] = __uint_as_float(w[i] << 16);
        x[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
}

// 16 bytes (16-byte aligned) copied with one vector load and store.
__device__ __forceinline__ void copy16(void *dst, const void *src) {
#if defined(__CUDACC__)
    *reinterpret_cast<uint4 *>(dst) = *reinterpret_cast<const uint4 *>(src);
#else
    memcpy(dst, src, 16);
#endif
}

// 4 bytes store (a packed bf16 pair) to a 4-byte-aligned address.
__device__ __forceinline__ void store_b32(void *dst, uint32_t v) {
#if defined(__CUDACC__)
    *reinterpret_cast<uint32_t *>(dst) = v;
#else
    memcpy(dst, &v, 4);
#endif
}

}  // namespace relora

#endif  // RELORA_MMA_CUH
