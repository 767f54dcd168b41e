// Fused forward/backward kernels of the decoder's memory-bound ops: RMSNorm, RoPE and the
// gated MLP activations (SwiGLU, GeGLU). Each replaces a chain of candle elementwise ops
// (one read and one write of the whole activation per op) by a single pass: read the
// inputs once, compute in f32, write the outputs once. The reference for all of them is
// the candle code in common/src/ops/{rms_norm,rope,activation}.rs.
//
// Element types: bf16 and f32 in and out, f32 arithmetic inside. Every kernel is
// instantiated per VEC, the number of consecutive elements a thread moves with one
// (at most 16-byte) vector access. The host picks the largest VEC that divides the row
// length and every start offset, so all vector accesses are aligned (cudarc allocations
// are 256-byte aligned) and no row has a tail.

#include <cuda_bf16.h>
#include <stdint.h>

// ---------------------------------------------------------------------------------------
// Vector loads and stores with conversion to and from f32.
// ---------------------------------------------------------------------------------------

#include "vec_io.cuh"

// ---------------------------------------------------------------------------------------
// Reductions.
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block, returned to every thread. Requirements (checked by the host):
// blockDim.x is a multiple of 32 (the shuffles use the full mask) and at most 1024 (one
// partial sum per warp in 32 slots). Every thread of the block must call it, and at most
// once per kernel: the shared slots are not re-armed for a second call.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[32];
  __shared__ float total;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float s = lane < (int)(blockDim.x >> 5) ? warp_sums[lane] : 0.0f;
    s = warp_sum(s);
    if (lane == 0) total = s;
  }
  __syncthreads();
  return total;
}

// ---------------------------------------------------------------------------------------
// RMSNorm: y = x * rstd * (w + w_offset), rstd = 1 / sqrt(mean(x²) + eps); w_offset is 1
// for Gemma's (1 + w) weight and 0 otherwise. One block per row of d elements; the second
// pass re-reads the row the same thread read moments before, which L1 still holds, so
// DRAM sees one read of x and w and one write of y.
// ---------------------------------------------------------------------------------------

template <typename T, int VEC>
__device__ __forceinline__ void rms_norm_fwd(const T* __restrict__ x, const T* __restrict__ w,
                                             T* __restrict__ y, float* __restrict__ rstd,
                                             int d, float eps, float w_offset) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * d;
  T* yr = y + row * d;
  const int nvec = d / VEC;
  float ss = 0.0f;
  for (int c = threadIdx.x; c < nvec; c += blockDim.x) {
    float v[VEC];
    load_f32<T, VEC>(xr + c * VEC, v);
#pragma unroll
    for (int k = 0; k < VEC; k++) ss = fmaf(v[k], v[k], ss);
  }
  const float r = rsqrtf(block_sum(ss) / (float)d + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int c = threadIdx.x; c < nvec; c += blockDim.x) {
    float v[VEC], wv[VEC], out[VEC];
    load_f32<T, VEC>(xr + c * VEC, v);
    load_f32<T, VEC>(w + c * VEC, wv);
#pragma unroll
    for (int k = 0; k < VEC; k++) out[k] = v[k] * r * (wv[k] + w_offset);
    store_f32<T, VEC>(yr + c * VEC, out);
  }
}

// dx = rstd * (g - x̂ * mean(g * x̂)) with g = dy * w_eff and x̂ = x * rstd; the mean is
// rstd * sum(dy * w_eff * x) / d, so the first pass needs only dy, x and w.
//
// With RES the kernel also adds the residual stream's gradient `res` (the gradient that
// skips the norm's branch): dx = res + the above, rounded once, instead of a separate add
// kernel reading both and writing the sum again.
template <typename T, int VEC, bool RES>
__device__ __forceinline__ void rms_norm_bwd(const T* __restrict__ dy, const T* __restrict__ x,
                                             const T* __restrict__ w,
                                             const float* __restrict__ rstd,
                                             const T* __restrict__ res,
                                             T* __restrict__ dx, int d, float w_offset) {
  const int64_t row = blockIdx.x;
  const T* dyr = dy + row * d;
  const T* xr = x + row * d;
  T* dxr = dx + row * d;
  const int nvec = d / VEC;
  const float r = rstd[row];
  float acc = 0.0f;
  for (int c = threadIdx.x; c < nvec; c += blockDim.x) {
    float g[VEC], v[VEC], wv[VEC];
    load_f32<T, VEC>(dyr + c * VEC, g);
    load_f32<T, VEC>(xr + c * VEC, v);
    load_f32<T, VEC>(w + c * VEC, wv);
#pragma unroll
    for (int k = 0; k < VEC; k++) acc = fmaf(g[k] * (wv[k] + w_offset), v[k], acc);
  }
  // mean(g * x̂) * rstd, the coefficient of x in dx / rstd.
  const float coef = r * r * (block_sum(acc) / (float)d);
  for (int c = threadIdx.x; c < nvec; c += blockDim.x) {
    float g[VEC], v[VEC], wv[VEC], out[VEC];
    load_f32<T, VEC>(dyr + c * VEC, g);
    load_f32<T, VEC>(xr + c * VEC, v);
    load_f32<T, VEC>(w + c * VEC, wv);
#pragma unroll
    for (int k = 0; k < VEC; k++) out[k] = r * (g[k] * (wv[k] + w_offset) - v[k] * coef);
    if (RES) {
      float rv[VEC];
      load_f32<T, VEC>(res + row * d + c * VEC, rv);
#pragma unroll
      for (int k = 0; k < VEC; k++) out[k] += rv[k];
    }
    store_f32<T, VEC>(dxr + c * VEC, out);
  }
}

#define RMS_NORM_KERNELS(SUFFIX, T, VEC)                                                    \
  extern "C" __global__ void fused_rms_norm_fwd_##SUFFIX(                                   \
      const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,                  \
      float* __restrict__ rstd, int d, float eps, float w_offset) {                         \
    rms_norm_fwd<T, VEC>(x, w, y, rstd, d, eps, w_offset);                                  \
  }                                                                                         \
  extern "C" __global__ void fused_rms_norm_bwd_##SUFFIX(                                   \
      const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,           \
      const float* __restrict__ rstd, T* __restrict__ dx, int d, float w_offset) {          \
    rms_norm_bwd<T, VEC, false>(dy, x, w, rstd, nullptr, dx, d, w_offset);                  \
  }                                                                                         \
  extern "C" __global__ void fused_rms_norm_bwd_res_##SUFFIX(                               \
      const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,           \
      const float* __restrict__ rstd, const T* __restrict__ res, T* __restrict__ dx, int d, \
      float w_offset) {                                                                     \
    rms_norm_bwd<T, VEC, true>(dy, x, w, rstd, res, dx, d, w_offset);                       \
  }

// ---------------------------------------------------------------------------------------
// RoPE in HF's rotate_half convention. For each (b, h, t) row of head_dim = 2 * half
// elements and i < half, with c = cos[pos, i], s = sin[pos, i] (both table halves are equal):
//   forward (angle +θ):  y[i] = x[i] c - x[i + half] s,  y[i + half] = x[i + half] c + x[i] s
//   backward (angle -θ): the same with s negated (`sign` = -1).
// Input and output rows are addressed through separate (batch, head, token) strides, so
// the same kernel also reads the [B, T, H, D] output of a linear layer and writes
// [B, H, T, D] (or the reverse), which fuses the transpose around RoPE. Rows are
// enumerated token-major, heads fastest: row = (b * T + t) * H + h, and the position of
// row's token is pos[b * T + t]. A thread handles VEC elements of the first half and the
// matching VEC of the second half.
// ---------------------------------------------------------------------------------------

// Work item i of a grid-stride loop over rows enumerated token-major, heads fastest
// (row = (b * T + t) * H + h), `per_row` vectors of VEC elements each: the row's token
// index b * T + t, and the element offsets of the item in the input and output layouts.
struct HeadItem {
  int64_t bt, in_off, out_off;
  __device__ __forceinline__ HeadItem(int64_t i, int per_row, int vec, int H, int T_len,
                                      int64_t in_sb, int64_t in_sh, int64_t in_st,
                                      int64_t out_sb, int64_t out_sh, int64_t out_st) {
    const int64_t row = i / per_row;
    const int64_t c = (i - row * per_row) * vec;
    bt = row / H;
    const int64_t h = row - bt * H;
    const int64_t b = bt / T_len;
    const int64_t t = bt - b * T_len;
    in_off = b * in_sb + h * in_sh + t * in_st + c;
    out_off = b * out_sb + h * out_sh + t * out_st + c;
  }
};

template <typename T, int VEC>
__device__ __forceinline__ void rope(const T* __restrict__ x, T* __restrict__ y,
                                     const uint32_t* __restrict__ pos,
                                     const float* __restrict__ cos_table,
                                     const float* __restrict__ sin_table, int64_t rows, int H,
                                     int T_len, int half, int64_t in_sb, int64_t in_sh,
                                     int64_t in_st, int64_t out_sb, int64_t out_sh,
                                     int64_t out_st, float sign) {
  const int per_row = half / VEC;
  const int64_t total = rows * per_row;
  const int64_t stride = (int64_t)blockDim.x * gridDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
    const HeadItem it(i, per_row, VEC, H, T_len, in_sb, in_sh, in_st, out_sb, out_sh, out_st);
    const int c = (int)(i % per_row) * VEC;
    const int64_t p = pos[it.bt];
    const T* xi = x + it.in_off;
    T* yo = y + it.out_off;
    float x1[VEC], x2[VEC], cs[VEC], sn[VEC], y1[VEC], y2[VEC];
    load_f32<T, VEC>(xi, x1);
    load_f32<T, VEC>(xi + half, x2);
    load_f32<float, VEC>(cos_table + p * (2 * half) + c, cs);
    load_f32<float, VEC>(sin_table + p * (2 * half) + c, sn);
#pragma unroll
    for (int k = 0; k < VEC; k++) {
      const float s = sign * sn[k];
      y1[k] = x1[k] * cs[k] - x2[k] * s;
      y2[k] = x2[k] * cs[k] + x1[k] * s;
    }
    store_f32<T, VEC>(yo, y1);
    store_f32<T, VEC>(yo + half, y2);
  }
}

#define ROPE_KERNEL(SUFFIX, T, VEC)                                                         \
  extern "C" __global__ void fused_rope_##SUFFIX(                                           \
      const T* __restrict__ x, T* __restrict__ y, const uint32_t* __restrict__ pos,         \
      const float* __restrict__ cos_table, const float* __restrict__ sin_table,             \
      int64_t rows, int H, int T_len, int half, int64_t in_sb, int64_t in_sh,               \
      int64_t in_st, int64_t out_sb, int64_t out_sh, int64_t out_st, float sign) {          \
    rope<T, VEC>(x, y, pos, cos_table, sin_table, rows, H, T_len, half, in_sb, in_sh,      \
                 in_st, out_sb, out_sh, out_st, sign);                                      \
  }

// ---------------------------------------------------------------------------------------
// The head transpose alone, [B, T, H, D] <-> [B, H, T, D] (v before attention, attention's
// output after it, and their gradients): rows enumerated and addressed as in `rope`, each
// row's d elements copied with VEC-wide accesses. candle's generic strided copy moves these
// at a seventh of the bandwidth (it indexes every element through the shape and strides).
// ---------------------------------------------------------------------------------------

template <typename T, int VEC>
__device__ __forceinline__ void head_copy(const T* __restrict__ x, T* __restrict__ y,
                                          int64_t rows, int H, int T_len, int d,
                                          int64_t in_sb, int64_t in_sh, int64_t in_st,
                                          int64_t out_sb, int64_t out_sh, int64_t out_st) {
  const int per_row = d / VEC;
  const int64_t total = rows * per_row;
  const int64_t stride = (int64_t)blockDim.x * gridDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
    const HeadItem it(i, per_row, VEC, H, T_len, in_sb, in_sh, in_st, out_sb, out_sh, out_st);
    float v[VEC];
    load_f32<T, VEC>(x + it.in_off, v);
    store_f32<T, VEC>(y + it.out_off, v);
  }
}

#define HEAD_COPY_KERNEL(SUFFIX, T, VEC)                                                    \
  extern "C" __global__ void fused_head_copy_##SUFFIX(                                      \
      const T* __restrict__ x, T* __restrict__ y, int64_t rows, int H, int T_len, int d,    \
      int64_t in_sb, int64_t in_sh, int64_t in_st, int64_t out_sb, int64_t out_sh,          \
      int64_t out_st) {                                                                     \
    head_copy<T, VEC>(x, y, rows, H, T_len, d, in_sb, in_sh, in_st, out_sb, out_sh, out_st); \
  }

// The residual stream's adds, out = a + b (f32 sum rounded once, as candle's add), with
// VEC-wide accesses: candle's add kernel moves one element per thread.
template <typename T, int VEC>
__device__ __forceinline__ void add(const T* __restrict__ a, const T* __restrict__ b,
                                    T* __restrict__ out, int64_t n_vec) {
  const int64_t stride = (int64_t)blockDim.x * gridDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n_vec; i += stride) {
    float x[VEC], y[VEC];
    load_f32<T, VEC>(a + i * VEC, x);
    load_f32<T, VEC>(b + i * VEC, y);
#pragma unroll
    for (int k = 0; k < VEC; k++) x[k] += y[k];
    store_f32<T, VEC>(out + i * VEC, x);
  }
}

#define ADD_KERNEL(SUFFIX, T, VEC)                                                          \
  extern "C" __global__ void fused_add_##SUFFIX(const T* __restrict__ a,                    \
                                                const T* __restrict__ b,                    \
                                                T* __restrict__ out, int64_t n_vec) {       \
    add<T, VEC>(a, b, out, n_vec);                                                          \
  }

// ---------------------------------------------------------------------------------------
// Gated activations m = act(gate) * up and their backward
//   dgate = dm * up * act'(gate),  dup = dm * act(gate)
// in one pass each. The formulas are those of ops/activation.rs (HF's ACT2FN).
// ---------------------------------------------------------------------------------------

// x * sigmoid(x). For x far below zero expf(-x) overflows to +inf and sigmoid to 0, which
// is the right limit for both the value and the derivative.
struct Silu {
  static __device__ __forceinline__ void eval(float x, float& a, float& da) {
    const float s = 1.0f / (1.0f + expf(-x));
    a = x * s;
    da = s * (1.0f + x * (1.0f - s));
  }
};

// 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³))), HF "gelu_pytorch_tanh" (Gemma).
struct GeluTanh {
  static __device__ __forceinline__ void eval(float x, float& a, float& da) {
    const float k0 = 0.7978845608028654f;  // √(2/π)
    const float k1 = 0.044715f;
    const float x2 = x * x;
    const float t = tanhf(k0 * x * (1.0f + k1 * x2));
    const float half_1pt = 0.5f * (1.0f + t);
    a = x * half_1pt;
    da = half_1pt + 0.5f * x * (1.0f - t * t) * k0 * (1.0f + 3.0f * k1 * x2);
  }
};

// 0.5 x (1 + erf(x / √2)), HF "gelu".
struct GeluErf {
  static __device__ __forceinline__ void eval(float x, float& a, float& da) {
    const float cdf = 0.5f * (1.0f + erff(x * 0.7071067811865476f));
    a = x * cdf;
    da = cdf + x * expf(-0.5f * x * x) * 0.3989422804014327f;  // φ(x) = e^{-x²/2} / √(2π)
  }
};

// n_vec groups of VEC elements; the host guarantees n = n_vec * VEC.
template <typename T, int VEC, typename Act>
__device__ __forceinline__ void glu_fwd(const T* __restrict__ gate, const T* __restrict__ up,
                                        T* __restrict__ out, int64_t n_vec) {
  const int64_t stride = (int64_t)blockDim.x * gridDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n_vec; i += stride) {
    float g[VEC], u[VEC], m[VEC];
    load_f32<T, VEC>(gate + i * VEC, g);
    load_f32<T, VEC>(up + i * VEC, u);
#pragma unroll
    for (int k = 0; k < VEC; k++) {
      float a, da;
      Act::eval(g[k], a, da);
      m[k] = a * u[k];
    }
    store_f32<T, VEC>(out + i * VEC, m);
  }
}

// gate/dgate and up/dup may be the same buffers (the in-place entry point): each element is
// read before it is written, by the one thread that owns it, hence no __restrict__ there.
template <typename T, int VEC, typename Act>
__device__ __forceinline__ void glu_bwd(const T* __restrict__ dm, const T* gate, const T* up,
                                        T* dgate, T* dup, int64_t n_vec) {
  const int64_t stride = (int64_t)blockDim.x * gridDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n_vec; i += stride) {
    float d[VEC], g[VEC], u[VEC], dg[VEC], du[VEC];
    load_f32<T, VEC>(dm + i * VEC, d);
    load_f32<T, VEC>(gate + i * VEC, g);
    load_f32<T, VEC>(up + i * VEC, u);
#pragma unroll
    for (int k = 0; k < VEC; k++) {
      float a, da;
      Act::eval(g[k], a, da);
      dg[k] = d[k] * u[k] * da;
      du[k] = d[k] * a;
    }
    store_f32<T, VEC>(dgate + i * VEC, dg);
    store_f32<T, VEC>(dup + i * VEC, du);
  }
}

#define GLU_KERNELS(ACTNAME, ACT, SUFFIX, T, VEC)                                           \
  extern "C" __global__ void fused_glu_fwd_##ACTNAME##_##SUFFIX(                            \
      const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out,            \
      int64_t n_vec) {                                                                      \
    glu_fwd<T, VEC, ACT>(gate, up, out, n_vec);                                             \
  }                                                                                         \
  extern "C" __global__ void fused_glu_bwd_##ACTNAME##_##SUFFIX(                            \
      const T* __restrict__ dm, const T* __restrict__ gate, const T* __restrict__ up,       \
      T* __restrict__ dgate, T* __restrict__ dup, int64_t n_vec) {                          \
    glu_bwd<T, VEC, ACT>(dm, gate, up, dgate, dup, n_vec);                                  \
  }                                                                                         \
  extern "C" __global__ void fused_glu_bwd_inplace_##ACTNAME##_##SUFFIX(                    \
      const T* __restrict__ dm, T* gate_dgate, T* up_dup, int64_t n_vec) {                  \
    glu_bwd<T, VEC, ACT>(dm, gate_dgate, up_dup, gate_dgate, up_dup, n_vec);                \
  }

// ---------------------------------------------------------------------------------------
// Instantiations: `<op>_<dtype>_v<VEC>`, VEC up to 16 bytes of elements (kernels/fused.rs
// names them the same way).
// ---------------------------------------------------------------------------------------

#define ALL_KERNELS(SUFFIX, T, VEC)                      \
  RMS_NORM_KERNELS(SUFFIX, T, VEC)                       \
  ROPE_KERNEL(SUFFIX, T, VEC)                            \
  HEAD_COPY_KERNEL(SUFFIX, T, VEC)                       \
  ADD_KERNEL(SUFFIX, T, VEC)                             \
  GLU_KERNELS(silu, Silu, SUFFIX, T, VEC)                \
  GLU_KERNELS(gelu_tanh, GeluTanh, SUFFIX, T, VEC)       \
  GLU_KERNELS(gelu_erf, GeluErf, SUFFIX, T, VEC)

ALL_KERNELS(bf16_v1, __nv_bfloat16, 1)
ALL_KERNELS(bf16_v2, __nv_bfloat16, 2)
ALL_KERNELS(bf16_v4, __nv_bfloat16, 4)
ALL_KERNELS(bf16_v8, __nv_bfloat16, 8)
ALL_KERNELS(f32_v1, float, 1)
ALL_KERNELS(f32_v2, float, 2)
ALL_KERNELS(f32_v4, float, 4)
