// Row kernel of the fused LM-head loss (common/src/loss.rs, CUDA path in
// common/src/kernels/loss.rs). The GEMMs around it (student logits, teacher logits,
// dh = dz · W) are cuBLAS; this kernel does everything between them for one chunk of
// token rows, one CTA per row:
//
//   - cross-entropy at temperature 1 over the student's full vocabulary [0, Vs),
//   - the divergence at temperature T over the first V_kd = min(Vs, Vt) entries of both
//     (forward KL, reverse KL or the generalized JSD with 0 < beta < 1),
//   - Gemma 2's final-logit softcap cap·tanh(z/cap) of the student and of the teacher,
//   - dz = ce_coef·(softmax(z) - onehot) + kd_coef·dD/du, times the softcap's derivative,
//     written over the student logits in place (ce_coef = grad_scale·ce_weight,
//     kd_coef = grad_scale·kd_weight·T: the KD term carries T² and u = z/T),
//   - the row's CE and divergence values in f32, summed in f64 on the host.
//
// The math is that of `divergence` in loss.rs, expressed with log-probabilities
// lq = z_s/T - LSE_s and lp = z_t/T - LSE_t:
//   forward  D = Σ p (lp - lq)                       dD/du = q - p
//   reverse  D = Σ q (lq - lp)                       dD/du = q (lq - lp - D)
//   JSD      lm = log(β p + (1-β) q)
//            D = β Σ p (lp - lm) + (1-β) Σ q (lq - lm)   dD/du = (1-β) q (lq - lm - Σ q (lq - lm))
//
// Passes over a row: (1) online log-sum-exp of the three distributions (student at 1,
// student at T, teacher at T); (2) reverse KL and JSD only: the sums the gradient needs;
// (3) the gradient, written in place (and the forward KL value). So each logit is read
// from global memory two or three times and written once, all in f32 arithmetic.
//
// Element types: the student logits S and the teacher logits TT are bf16 or f32 each.
// VEC consecutive elements move per access (16-byte pieces at most); the host picks VEC
// so that it divides Vs, the teacher's row stride and every start offset, so every vector
// access is aligned and V_kd = min(Vs, Vt) is a multiple of VEC too.

#include <cuda_bf16.h>
#include <stdint.h>

#include "vec_io.cuh"

// ---------------------------------------------------------------------------------------
// Log-sum-exp state (running max m, sum s of exp(x - m)) and block reductions.
// ---------------------------------------------------------------------------------------

// Merges (mo, so) into (m, s). An empty side has m = -inf and s = 0; exp(-inf) = 0 makes
// it drop out, and two empty sides stay empty.
__device__ __forceinline__ void lse_merge(float& m, float& s, float mo, float so) {
  const float mx = fmaxf(m, mo);
  if (mx == -INFINITY) return;
  s = s * __expf(m - mx) + so * __expf(mo - mx);
  m = mx;
}

// Adds VEC values to (m, s), rescaling once per vector rather than once per element.
template <int VEC>
__device__ __forceinline__ void lse_add(float& m, float& s, const float (&x)[VEC]) {
  float mx = x[0];
#pragma unroll
  for (int k = 1; k < VEC; k++) mx = fmaxf(mx, x[k]);
  if (mx > m) {
    s *= __expf(m - mx);
    m = mx;
  }
  if (m == -INFINITY) return;
#pragma unroll
  for (int k = 0; k < VEC; k++) s += __expf(x[k] - m);
}

// K log-sum-exp states merged over the block; every thread gets the merged states.
// blockDim.x is a multiple of 32, at most 1024. The two barriers make repeated calls safe.
template <int K>
__device__ __forceinline__ void block_lse(float (&m)[K], float (&s)[K]) {
  __shared__ float sm[K][32], ss[K][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int i = 0; i < K; i++) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[i], o);
      const float so = __shfl_xor_sync(0xffffffffu, s[i], o);
      lse_merge(m[i], s[i], mo, so);
    }
    if (lane == 0) {
      sm[i][warp] = m[i];
      ss[i][warp] = s[i];
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < K; i++) {
    // Every thread merges the per-warp states in the same order: same result everywhere.
    float mi = sm[i][0], si = ss[i][0];
    for (int w = 1; w < nwarps; w++) lse_merge(mi, si, sm[i][w], ss[i][w]);
    m[i] = mi;
    s[i] = si;
  }
  __syncthreads();
}

// K sums over the block, returned to every thread (fixed order: deterministic).
template <int K>
__device__ __forceinline__ void block_sum(float (&v)[K]) {
  __shared__ float sv[K][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int i = 0; i < K; i++) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[i] += __shfl_xor_sync(0xffffffffu, v[i], o);
    if (lane == 0) sv[i][warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < K; i++) {
    float t = 0.0f;
    for (int w = 0; w < nwarps; w++) t += sv[i][w];
    v[i] = t;
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------
// The row kernel.
// ---------------------------------------------------------------------------------------

enum Kind { KIND_NONE = 0, KIND_FORWARD = 1, KIND_REVERSE = 2, KIND_JSD = 3 };

// cap·tanh(z/cap) in place, and 1 - tanh² (the derivative) in dcap; no-op for cap <= 0.
template <int VEC>
__device__ __forceinline__ void softcap(float (&z)[VEC], float (&dcap)[VEC], float cap) {
#pragma unroll
  for (int k = 0; k < VEC; k++) {
    if (cap > 0.0f) {
      const float t = tanhf(z[k] / cap);
      z[k] = cap * t;
      dcap[k] = 1.0f - t * t;
    } else {
      dcap[k] = 1.0f;
    }
  }
}

// One CTA per row r of the chunk:
//   zs + r·ld_s: the student's logits row (Vs entries), overwritten with dz;
//   zt + row_t·ld_t: the teacher's logits row, row_t = zt_rows[r] if zt_rows_on else r;
//   labels[r] in [0, Vs); ce_out[r], kd_out[r]: the row's CE and divergence (f32).
// kind = KIND_NONE ignores zt, zt_rows and writes kd_out[r] = 0.
template <typename S, typename TT, int VEC>
__device__ __forceinline__ void loss_rows(S* __restrict__ zs, int64_t ld_s,
                                          const TT* __restrict__ zt, int64_t ld_t,
                                          const int32_t* __restrict__ zt_rows, int zt_rows_on,
                                          const int32_t* __restrict__ labels,
                                          float* __restrict__ ce_out, float* __restrict__ kd_out,
                                          int vs, int v_kd, int kind, float inv_t, float beta,
                                          float s_cap, float t_cap, float ce_coef,
                                          float kd_coef) {
  const int64_t r = blockIdx.x;
  S* zr = zs + r * ld_s;
  const TT* tr = kind == KIND_NONE ? nullptr : zt + (zt_rows_on ? (int64_t)zt_rows[r] : r) * ld_t;
  const int label = labels[r];
  const int step = blockDim.x * VEC;
  const bool kd = kind != KIND_NONE;

  // The label's (capped) logit, read before pass 3 overwrites it; the barriers inside the
  // reductions order this read before any write.
  float z_label = 0.0f;
  if (threadIdx.x == 0) {
    z_label = to_f32(zr[label]);
    if (s_cap > 0.0f) z_label = s_cap * tanhf(z_label / s_cap);
  }

  // Pass 1: [0] student at T = 1 over [0, Vs), [1] student at T and [2] teacher at T over
  // [0, V_kd).
  float m[3] = {-INFINITY, -INFINITY, -INFINITY}, s[3] = {0.0f, 0.0f, 0.0f};
  for (int j = threadIdx.x * VEC; j < vs; j += step) {
    float z[VEC], dc[VEC];
    load_f32<S, VEC>(zr + j, z);
    softcap<VEC>(z, dc, s_cap);
    lse_add<VEC>(m[0], s[0], z);
    if (kd && j < v_kd) {
      float u[VEC], t[VEC];
      load_f32<TT, VEC>(tr + j, t);
      softcap<VEC>(t, dc, t_cap);
#pragma unroll
      for (int k = 0; k < VEC; k++) {
        u[k] = z[k] * inv_t;
        t[k] *= inv_t;
      }
      lse_add<VEC>(m[1], s[1], u);
      lse_add<VEC>(m[2], s[2], t);
    }
  }
  block_lse<3>(m, s);
  const float lse1 = m[0] + __logf(s[0]);
  const float lse_s = m[1] + __logf(s[1]);
  const float lse_t = m[2] + __logf(s[2]);
  const float log_1mb = __logf(1.0f - beta), log_b = __logf(beta);

  // Pass 2: what the gradient needs besides the normalisers. Reverse: D. JSD: KL(p‖m) and
  // KL(q‖m).
  float acc[2] = {0.0f, 0.0f};
  if (kind == KIND_REVERSE || kind == KIND_JSD) {
    for (int j = threadIdx.x * VEC; j < v_kd; j += step) {
      float z[VEC], t[VEC], dc[VEC];
      load_f32<S, VEC>(zr + j, z);
      load_f32<TT, VEC>(tr + j, t);
      softcap<VEC>(z, dc, s_cap);
      softcap<VEC>(t, dc, t_cap);
#pragma unroll
      for (int k = 0; k < VEC; k++) {
        const float lq = z[k] * inv_t - lse_s, lp = t[k] * inv_t - lse_t;
        if (kind == KIND_REVERSE) {
          acc[0] += __expf(lq) * (lq - lp);
        } else {
          const float a = lq + log_1mb, b = lp + log_b;
          const float hi = fmaxf(a, b);
          const float lm = hi + log1pf(__expf(fminf(a, b) - hi));
          acc[0] += __expf(lp) * (lp - lm);
          acc[1] += __expf(lq) * (lq - lm);
        }
      }
    }
    block_sum<2>(acc);
  }
  // The row's divergence (forward KL is summed in pass 3) and the gradient's offset.
  float d = 0.0f, offset = 0.0f;
  if (kind == KIND_REVERSE) {
    d = acc[0];
    offset = acc[0];
  } else if (kind == KIND_JSD) {
    d = beta * acc[0] + (1.0f - beta) * acc[1];
    offset = acc[1];
  }

  // Pass 3: dz, in place.
  float fwd = 0.0f;
  for (int j = threadIdx.x * VEC; j < vs; j += step) {
    float z[VEC], dc[VEC], g[VEC];
    load_f32<S, VEC>(zr + j, z);
    softcap<VEC>(z, dc, s_cap);
#pragma unroll
    for (int k = 0; k < VEC; k++) g[k] = ce_coef * (__expf(z[k] - lse1) - (j + k == label ? 1.0f : 0.0f));
    if (kd && j < v_kd) {
      float t[VEC], tdc[VEC];
      load_f32<TT, VEC>(tr + j, t);
      softcap<VEC>(t, tdc, t_cap);
#pragma unroll
      for (int k = 0; k < VEC; k++) {
        const float lq = z[k] * inv_t - lse_s, lp = t[k] * inv_t - lse_t;
        const float q = __expf(lq);
        float du;
        if (kind == KIND_FORWARD) {
          const float p = __expf(lp);
          fwd += p * (lp - lq);
          du = q - p;
        } else if (kind == KIND_REVERSE) {
          du = q * (lq - lp - offset);
        } else {
          const float a = lq + log_1mb, b = lp + log_b;
          const float hi = fmaxf(a, b);
          const float lm = hi + log1pf(__expf(fminf(a, b) - hi));
          du = (1.0f - beta) * q * (lq - lm - offset);
        }
        g[k] += kd_coef * du;
      }
    }
#pragma unroll
    for (int k = 0; k < VEC; k++) g[k] *= dc[k];
    store_f32<S, VEC>(zr + j, g);
  }
  if (kind == KIND_FORWARD) {
    float f[1] = {fwd};
    block_sum<1>(f);
    d = f[0];
  }
  if (threadIdx.x == 0) {
    ce_out[r] = lse1 - z_label;
    kd_out[r] = kd ? d : 0.0f;
  }
}

#define LOSS_ROWS_KERNEL(SUFFIX, S, TT, VEC)                                                 \
  extern "C" __global__ void loss_rows_##SUFFIX(                                             \
      S* __restrict__ zs, int64_t ld_s, const TT* __restrict__ zt, int64_t ld_t,             \
      const int32_t* __restrict__ zt_rows, int zt_rows_on, const int32_t* __restrict__ labels, \
      float* __restrict__ ce_out, float* __restrict__ kd_out, int vs, int v_kd, int kind,   \
      float inv_t, float beta, float s_cap, float t_cap, float ce_coef, float kd_coef) {     \
    loss_rows<S, TT, VEC>(zs, ld_s, zt, ld_t, zt_rows, zt_rows_on, labels, ce_out, kd_out,   \
                          vs, v_kd, kind, inv_t, beta, s_cap, t_cap, ce_coef, kd_coef);      \
  }

#define LOSS_ROWS_ALL_VEC(NAME, S, TT)     \
  LOSS_ROWS_KERNEL(NAME##_v8, S, TT, 8)    \
  LOSS_ROWS_KERNEL(NAME##_v4, S, TT, 4)    \
  LOSS_ROWS_KERNEL(NAME##_v2, S, TT, 2)    \
  LOSS_ROWS_KERNEL(NAME##_v1, S, TT, 1)

LOSS_ROWS_ALL_VEC(bf16_bf16, __nv_bfloat16, __nv_bfloat16)
LOSS_ROWS_ALL_VEC(bf16_f32, __nv_bfloat16, float)
LOSS_ROWS_ALL_VEC(f32_bf16, float, __nv_bfloat16)
LOSS_ROWS_ALL_VEC(f32_f32, float, float)

// ---------------------------------------------------------------------------------------
// dst[rows[i]·d + k] = src[i·d + k]: the dh rows of a chunk whose tokens are not
// consecutive, put back at their token positions.
// ---------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void scatter_rows(const T* __restrict__ src, T* __restrict__ dst,
                                             const int32_t* __restrict__ rows, int64_t n_rows,
                                             int64_t d) {
  const int64_t total = n_rows * d;
  const int64_t stride = (int64_t)blockDim.x * gridDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t row = i / d;
    dst[(int64_t)rows[row] * d + (i - row * d)] = src[i];
  }
}

extern "C" __global__ void loss_scatter_rows_bf16(const __nv_bfloat16* __restrict__ src,
                                                  __nv_bfloat16* __restrict__ dst,
                                                  const int32_t* __restrict__ rows,
                                                  int64_t n_rows, int64_t d) {
  scatter_rows(src, dst, rows, n_rows, d);
}

extern "C" __global__ void loss_scatter_rows_f32(const float* __restrict__ src,
                                                 float* __restrict__ dst,
                                                 const int32_t* __restrict__ rows,
                                                 int64_t n_rows, int64_t d) {
  scatter_rows(src, dst, rows, n_rows, d);
}
