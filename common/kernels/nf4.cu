// NF4 dequantization (bitsandbytes layout), for base weights that stay 4-bit on the GPU
// and are expanded right before each GEMM.
//
// Layout (see common/src/nf4.rs): element 2k is the high nibble of packed[k], 2k+1 the low
// nibble; blocks of `blocksize` consecutive elements share one scale. With double
// quantization the scale of block b is code2[qabs[b]] * absmax2[b / blocksize2] + offset.
//
// The kernel is bound by DRAM bandwidth: 0.5 B read and 2 B (bf16) or 4 B (f32) written per
// element. Each thread owns UNITS "units" of 8 * VEC elements (4 * VEC packed bytes in,
// 16 * VEC or 32 * VEC bytes out; the library's kernels use VEC 1). Unit j of a thread sits blockDim*gridDim units after unit j-1, so that each load
// instruction of a warp reads 128 contiguous bytes and (VEC 1) each store writes 512 (bf16)
// or 1024 (f32) contiguous bytes: full sectors on both sides. All UNITS packed loads are issued
// before the first use, so every thread keeps UNITS independent reads in flight.
//
// Arithmetic is written with __fmul_rn/__fadd_rn so that nvcc cannot contract it into
// fused multiply-adds: the result must be bitwise the CPU's (and bitsandbytes')
// `code[q] * absmax2 + offset` followed by `NF4[c] * scale`, each rounded to f32.

#include <cuda_bf16.h>
#include <stdint.h>

// bitsandbytes' NF4 codebook, as NF4_CODE in common/src/nf4.rs (the GPU self-test compares
// this kernel bit for bit with the CPU dequantization, so the two cannot drift apart).
__constant__ float NF4_CODE[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

// Scale of NF4 block `b`. DQ selects double-quantized absmax (qabs + code2 + absmax2 +
// offset) over plain f32 absmax (absmax_f32).
template <bool DQ>
__device__ __forceinline__ float block_scale(
    int64_t b,
    const float* __restrict__ absmax_f32,
    const uint8_t* __restrict__ qabs,
    const float* __restrict__ code2_smem,
    const float* __restrict__ absmax2,
    float offset,
    int bs2_shift) {
  if (DQ) {
    float c = code2_smem[__ldg(qabs + b)];
    return __fadd_rn(__fmul_rn(c, __ldg(absmax2 + (b >> bs2_shift))), offset);
  } else {
    return __ldg(absmax_f32 + b);
  }
}

template <typename T>
struct Out;

// Streaming (evict-first) or plain 16-byte store.
template <bool CS>
__device__ __forceinline__ void st16(void* dst, uint4 w) {
  if (CS) {
    __stcs(reinterpret_cast<uint4*>(dst), w);
  } else {
    *reinterpret_cast<uint4*>(dst) = w;
  }
}

template <>
struct Out<__nv_bfloat16> {
  // 8 values -> one 16-byte store. __floats2bfloat162_rn puts its first argument in the
  // low half, which is the lower address on a little-endian GPU.
  template <bool CS>
  static __device__ __forceinline__ void store8(__nv_bfloat16* dst, const float* v) {
    uint4 w;
    __nv_bfloat162 p0 = __floats2bfloat162_rn(v[0], v[1]);
    __nv_bfloat162 p1 = __floats2bfloat162_rn(v[2], v[3]);
    __nv_bfloat162 p2 = __floats2bfloat162_rn(v[4], v[5]);
    __nv_bfloat162 p3 = __floats2bfloat162_rn(v[6], v[7]);
    w.x = *reinterpret_cast<uint32_t*>(&p0);
    w.y = *reinterpret_cast<uint32_t*>(&p1);
    w.z = *reinterpret_cast<uint32_t*>(&p2);
    w.w = *reinterpret_cast<uint32_t*>(&p3);
    st16<CS>(dst, w);
  }
  static __device__ __forceinline__ void store1(__nv_bfloat16* dst, float v) {
    *dst = __float2bfloat16_rn(v);
  }
};

template <>
struct Out<float> {
  template <bool CS>
  static __device__ __forceinline__ void store8(float* dst, const float* v) {
    st16<CS>(dst, make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3])));
    st16<CS>(dst + 4, make_uint4(__float_as_uint(v[4]), __float_as_uint(v[5]), __float_as_uint(v[6]), __float_as_uint(v[7])));
  }
  static __device__ __forceinline__ void store1(float* dst, float v) { *dst = v; }
};

// Packed words of one unit: VEC 32-bit words (4 * VEC bytes, 8 * VEC elements).
template <int VEC>
struct Words;
template <>
struct Words<1> {
  uint32_t w[1];
  static __device__ __forceinline__ Words load(const uint8_t* p) {
    Words r;
    r.w[0] = __ldcs(reinterpret_cast<const unsigned int*>(p));
    return r;
  }
};
template <>
struct Words<2> {
  uint32_t w[2];
  static __device__ __forceinline__ Words load(const uint8_t* p) {
    uint2 v = __ldcs(reinterpret_cast<const uint2*>(p));
    Words r;
    r.w[0] = v.x;
    r.w[1] = v.y;
    return r;
  }
};
template <>
struct Words<4> {
  uint32_t w[4];
  static __device__ __forceinline__ Words load(const uint8_t* p) {
    uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
    Words r;
    r.w[0] = v.x;
    r.w[1] = v.y;
    r.w[2] = v.z;
    r.w[3] = v.w;
    return r;
  }
};

// Dequantizes elements [0, n) into out. Block sizes come as shifts (log2): bitsandbytes'
// block sizes are powers of two, and a shift is one instruction where a 64-bit division is
// dozens.
//
// A "unit" is 8 * VEC elements (VEC packed words in, VEC 16-byte bf16 stores out); a
// thread owns UNITS units per iteration, one grid stride apart, and issues all their loads
// before the first use. CS selects streaming (evict-first) stores. Requirements checked by
// the host: blocksize >= 8 * VEC (a unit never straddles two scale blocks), packed aligned
// to 4 * VEC bytes, out 16-byte aligned.
template <typename T, bool DQ, int UNITS, int VEC, bool CS>
__device__ __forceinline__ void nf4_dequant(
    const uint8_t* __restrict__ packed,
    int64_t n,
    int bs_shift,
    const float* __restrict__ absmax_f32,
    const uint8_t* __restrict__ qabs,
    const float* __restrict__ code2,
    const float* __restrict__ absmax2,
    float offset,
    int bs2_shift,
    T* __restrict__ out) {
  __shared__ float code2_smem[256];
  __shared__ float nf4[16];
  if (DQ) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) code2_smem[i] = code2[i];
  }
  if (threadIdx.x < 16) nf4[threadIdx.x] = NF4_CODE[threadIdx.x];
  __syncthreads();

  constexpr int ELEMS = 8 * VEC;
  const int64_t n_units = n / ELEMS;
  const int64_t stride = (int64_t)blockDim.x * gridDim.x;
  for (int64_t base = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; base < n_units;
       base += stride * UNITS) {
    // Every global read of the iteration is issued before the first use: the packed
    // words and, per unit, its block's scale inputs.
    Words<VEC> w[UNITS];
    float s[UNITS];
#pragma unroll
    for (int j = 0; j < UNITS; j++) {
      int64_t u = base + j * stride;
      bool live = u < n_units;
      if (live) {
        w[j] = Words<VEC>::load(packed + u * (4 * VEC));
      }
      s[j] = live ? block_scale<DQ>((u * ELEMS) >> bs_shift, absmax_f32, qabs, code2_smem,
                                    absmax2, offset, bs2_shift)
                  : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < UNITS; j++) {
      int64_t u = base + j * stride;
      if (u >= n_units) break;
#pragma unroll
      for (int q = 0; q < VEC; q++) {
        float v[8];
#pragma unroll
        for (int k = 0; k < 4; k++) {
          uint32_t byte = (w[j].w[q] >> (8 * k)) & 0xffu;
          v[2 * k] = __fmul_rn(nf4[byte >> 4], s[j]);
          v[2 * k + 1] = __fmul_rn(nf4[byte & 0xfu], s[j]);
        }
        Out<T>::template store8<CS>(out + u * ELEMS + q * 8, v);
      }
    }
  }

  // The last n % ELEMS elements (fewer than 32), when n is not a multiple of ELEMS.
  const int64_t tail = n_units * ELEMS;
  if (blockIdx.x == 0 && threadIdx.x < n - tail) {
    int64_t e = tail + threadIdx.x;
    uint8_t byte = packed[e / 2];
    uint32_t c = (e % 2 == 0) ? (byte >> 4) : (byte & 0xfu);
    float s = block_scale<DQ>(e >> bs_shift, absmax_f32, qabs, code2_smem, absmax2, offset,
                              bs2_shift);
    Out<T>::store1(out + e, __fmul_rn(nf4[c], s));
  }
}

#define NF4_KERNEL(NAME, T, DQ, UNITS, VEC, CS)                                             \
  extern "C" __global__ void NAME(const uint8_t* __restrict__ packed, int64_t n,           \
                                  int bs_shift, const float* __restrict__ absmax_f32,       \
                                  const uint8_t* __restrict__ qabs,                         \
                                  const float* __restrict__ code2,                          \
                                  const float* __restrict__ absmax2, float offset,          \
                                  int bs2_shift, T* __restrict__ out) {                     \
    nf4_dequant<T, DQ, UNITS, VEC, CS>(packed, n, bs_shift, absmax_f32, qabs, code2,       \
                                       absmax2, offset, bs2_shift, out);                    \
  }

// The kernels the library launches: UNITS 2, VEC 1 (two 4-byte loads in flight per thread,
// one 16-byte store per unit), the fastest shape measured on an H100 (BENCHMARKS.md).
NF4_KERNEL(nf4_dequant_bf16_dq, __nv_bfloat16, true, 2, 1, false)
NF4_KERNEL(nf4_dequant_bf16_f32absmax, __nv_bfloat16, false, 2, 1, false)
NF4_KERNEL(nf4_dequant_f32_dq, float, true, 2, 1, false)
NF4_KERNEL(nf4_dequant_f32_f32absmax, float, false, 2, 1, false)

// Other launch shapes of the bf16 double-quant kernel, timed beside it by the benchmark
// (`nf4_dequant_bf16_dq_u{UNITS}v{VEC}[cs]`; cs = streaming stores). 16-byte loads (VEC 4)
// measured 1.7x slower: each lane then writes 64 contiguous bytes, so a warp's store
// instruction touches 32 separate 16-byte pieces instead of one 512-byte run.
NF4_KERNEL(nf4_dequant_bf16_dq_u2v1cs, __nv_bfloat16, true, 2, 1, true)
NF4_KERNEL(nf4_dequant_bf16_dq_u4v1, __nv_bfloat16, true, 4, 1, false)
NF4_KERNEL(nf4_dequant_bf16_dq_u4v1cs, __nv_bfloat16, true, 4, 1, true)
NF4_KERNEL(nf4_dequant_bf16_dq_u8v1, __nv_bfloat16, true, 8, 1, false)
NF4_KERNEL(nf4_dequant_bf16_dq_u2v2, __nv_bfloat16, true, 2, 2, false)
