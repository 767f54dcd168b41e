// NF4 dequantization (bitsandbytes layout), for base weights that stay 4-bit on the GPU
// and are expanded right before each GEMM.
//
// Layout (see common/src/nf4.rs): element 2k is the high nibble of packed[k], 2k+1 the low
// nibble; blocks of `blocksize` consecutive elements share one scale. With double
// quantization the scale of block b is code2[qabs[b]] * absmax2[b / blocksize2] + offset.
//
// The kernel is bound by DRAM bandwidth: 0.5 B read and 2 B (bf16) or 4 B (f32) written per
// element. Each thread owns UNITS "units" of 8 elements (4 packed bytes in, 16 or 32 bytes
// out). Unit j of a thread sits blockDim*gridDim units after unit j-1, so that each load
// instruction of a warp reads 128 contiguous bytes and each store writes 512 (bf16) or 1024
// (f32) contiguous bytes: full sectors on both sides. All UNITS packed loads are issued
// before the first use, so every thread keeps UNITS independent reads in flight.
//
// Arithmetic is written with __fmul_rn/__fadd_rn so that nvcc cannot contract it into
// fused multiply-adds: the result must be bitwise the CPU's (and bitsandbytes')
// `code[q] * absmax2 + offset` followed by `NF4[c] * scale`, each rounded to f32.

#include <cuda_bf16.h>
#include <stdint.h>

#define UNITS 4

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

template <>
struct Out<__nv_bfloat16> {
  // 8 values -> one 16-byte store. __floats2bfloat162_rn puts its first argument in the
  // low half, which is the lower address on a little-endian GPU.
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
    *reinterpret_cast<uint4*>(dst) = w;
  }
  static __device__ __forceinline__ void store1(__nv_bfloat16* dst, float v) {
    *dst = __float2bfloat16_rn(v);
  }
};

template <>
struct Out<float> {
  static __device__ __forceinline__ void store8(float* dst, const float* v) {
    reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
  static __device__ __forceinline__ void store1(float* dst, float v) { *dst = v; }
};

// Dequantizes elements [0, n) into out. Block sizes come as shifts (log2): bitsandbytes'
// block sizes are powers of two, and a shift is one instruction where a 64-bit division is
// dozens. Requirements checked by the host: blocksize >= 8 (so a unit of 8 never straddles
// two blocks), packed 4-byte aligned, out 16-byte aligned.
template <typename T, bool DQ>
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

  const int64_t n_units = n / 8;
  const int64_t stride = (int64_t)blockDim.x * gridDim.x;
  const uint32_t* words = reinterpret_cast<const uint32_t*>(packed);
  for (int64_t base = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; base < n_units;
       base += stride * UNITS) {
    // Every global read of the iteration is issued before the first use: the packed
    // words and, per unit, its block's scale inputs.
    uint32_t w[UNITS];
    float s[UNITS];
#pragma unroll
    for (int j = 0; j < UNITS; j++) {
      int64_t u = base + j * stride;
      bool live = u < n_units;
      w[j] = live ? __ldcs(words + u) : 0u;
      s[j] = live ? block_scale<DQ>((u * 8) >> bs_shift, absmax_f32, qabs, code2_smem, absmax2,
                                    offset, bs2_shift)
                  : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < UNITS; j++) {
      int64_t u = base + j * stride;
      if (u >= n_units) break;
      float v[8];
#pragma unroll
      for (int k = 0; k < 4; k++) {
        uint32_t byte = (w[j] >> (8 * k)) & 0xffu;
        v[2 * k] = __fmul_rn(nf4[byte >> 4], s[j]);
        v[2 * k + 1] = __fmul_rn(nf4[byte & 0xfu], s[j]);
      }
      Out<T>::store8(out + u * 8, v);
    }
  }

  // The last n % 8 elements (at most 7), when n is not a multiple of 8.
  const int64_t tail = n_units * 8;
  if (blockIdx.x == 0 && threadIdx.x < n - tail) {
    int64_t e = tail + threadIdx.x;
    uint8_t byte = packed[e / 2];
    uint32_t c = (e % 2 == 0) ? (byte >> 4) : (byte & 0xfu);
    float s = block_scale<DQ>(e >> bs_shift, absmax_f32, qabs, code2_smem, absmax2, offset,
                              bs2_shift);
    Out<T>::store1(out + e, __fmul_rn(nf4[c], s));
  }
}

#define NF4_KERNEL(NAME, T, DQ)                                                             \
  extern "C" __global__ void NAME(const uint8_t* __restrict__ packed, int64_t n,           \
                                  int bs_shift, const float* __restrict__ absmax_f32,       \
                                  const uint8_t* __restrict__ qabs,                         \
                                  const float* __restrict__ code2,                          \
                                  const float* __restrict__ absmax2, float offset,          \
                                  int bs2_shift, T* __restrict__ out) {                     \
    nf4_dequant<T, DQ>(packed, n, bs_shift, absmax_f32, qabs, code2, absmax2, offset,      \
                       bs2_shift, out);                                                     \
  }

NF4_KERNEL(nf4_dequant_bf16_dq, __nv_bfloat16, true)
NF4_KERNEL(nf4_dequant_bf16_f32absmax, __nv_bfloat16, false)
NF4_KERNEL(nf4_dequant_f32_dq, float, true)
NF4_KERNEL(nf4_dequant_f32_f32absmax, float, false)
