// The optimizer step over the LoRA adapters' flat fp32 buffers, resident on the device:
// torch.optim.AdamW, the global gradient norm that clipping needs, and the cast of the fp32
// master weights into the compute-dtype copy that the forward reads.
//
// All three are bound by DRAM bandwidth (a few bytes moved per flop), so each thread walks
// the buffer in a grid-stride loop with 16-byte loads; every buffer is a whole cudarc
// allocation (256-byte aligned), and the last n % 4 elements take a scalar path.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// One AdamW update of one element, op for op as AdamW::step in common/src/optim.rs (which
// follows torch's _single_tensor_adam). The explicitly rounded intrinsics keep nvcc from
// contracting products and sums into FMAs, so the device step is bitwise the host step
// for the same gradients. `grad_scale` is the clipping coefficient (1 when not clipping):
// the host multiplies the stored gradient by it first, which is the same f32 product.
__device__ __forceinline__ void adamw_update(
    float& p, float& m, float& v, float g,
    float grad_scale, float decay, float w1, float beta2, float w2, float bc2_sqrt, float eps, float step_size) {
  g = __fmul_rn(g, grad_scale);
  p = __fmul_rn(p, decay);
  m = __fadd_rn(m, __fmul_rn(w1, __fsub_rn(g, m)));
  v = __fadd_rn(__fmul_rn(v, beta2), __fmul_rn(__fmul_rn(w2, g), g));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), bc2_sqrt), eps);
  p = __fsub_rn(p, __fmul_rn(step_size, __fdiv_rn(m, denom)));
}

extern "C" __global__ void adamw_f32(
    float* __restrict__ params,
    float* __restrict__ exp_avg,
    float* __restrict__ exp_avg_sq,
    const float* __restrict__ grads,
    int64_t n,
    float grad_scale, float decay, float w1, float beta2, float w2, float bc2_sqrt, float eps, float step_size) {
  const int64_t stride = (int64_t)blockDim.x * gridDim.x;
  const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t n4 = n / 4;
  float4* p4 = reinterpret_cast<float4*>(params);
  float4* m4 = reinterpret_cast<float4*>(exp_avg);
  float4* v4 = reinterpret_cast<float4*>(exp_avg_sq);
  const float4* g4 = reinterpret_cast<const float4*>(grads);
  for (int64_t i = first; i < n4; i += stride) {
    float4 p = p4[i], m = m4[i], v = v4[i];
    const float4 g = g4[i];
    adamw_update(p.x, m.x, v.x, g.x, grad_scale, decay, w1, beta2, w2, bc2_sqrt, eps, step_size);
    adamw_update(p.y, m.y, v.y, g.y, grad_scale, decay, w1, beta2, w2, bc2_sqrt, eps, step_size);
    adamw_update(p.z, m.z, v.z, g.z, grad_scale, decay, w1, beta2, w2, bc2_sqrt, eps, step_size);
    adamw_update(p.w, m.w, v.w, g.w, grad_scale, decay, w1, beta2, w2, bc2_sqrt, eps, step_size);
    p4[i] = p;
    m4[i] = m;
    v4[i] = v;
  }
  for (int64_t i = 4 * n4 + first; i < n; i += stride) {
    adamw_update(params[i], exp_avg[i], exp_avg_sq[i], grads[i], grad_scale, decay, w1, beta2, w2, bc2_sqrt, eps,
                 step_size);
  }
}

// Sum of squares in two passes with a fixed order, so that the same gradients give the same
// norm on every run (no atomics): pass 1 leaves one partial per block, pass 2 (one block)
// adds the partials. Squares are accumulated in f64, as the host's grad_norm does, so the
// clipping coefficient agrees with the CPU path to f32 rounding.
constexpr int NORM_THREADS = 256;

// Tree sum over the block in shared memory (fixed pairing, hence a fixed rounding order).
__device__ __forceinline__ double block_sum(double x) {
  __shared__ double s[NORM_THREADS];
  s[threadIdx.x] = x;
  __syncthreads();
  for (int half = NORM_THREADS / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) s[threadIdx.x] += s[threadIdx.x + half];
    __syncthreads();
  }
  return s[0];
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
sumsq_partial_f32(const float* __restrict__ x, int64_t n, double* __restrict__ partial) {
  const int64_t stride = (int64_t)NORM_THREADS * gridDim.x;
  const int64_t first = (int64_t)blockIdx.x * NORM_THREADS + threadIdx.x;
  const int64_t n4 = n / 4;
  const float4* x4 = reinterpret_cast<const float4*>(x);
  double acc = 0.0;
  for (int64_t i = first; i < n4; i += stride) {
    const float4 v = x4[i];
    acc = fma((double)v.x, (double)v.x, acc);
    acc = fma((double)v.y, (double)v.y, acc);
    acc = fma((double)v.z, (double)v.z, acc);
    acc = fma((double)v.w, (double)v.w, acc);
  }
  for (int64_t i = 4 * n4 + first; i < n; i += stride) {
    acc = fma((double)x[i], (double)x[i], acc);
  }
  const double total = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
sum_partials_f64(const double* __restrict__ partial, int n, double* __restrict__ out) {
  double acc = 0.0;
  for (int i = threadIdx.x; i < n; i += NORM_THREADS) acc += partial[i];
  const double total = block_sum(acc);
  if (threadIdx.x == 0) out[0] = total;
}

// fp32 master weights -> compute-dtype copy, rounded to nearest even as candle's to_dtype
// rounds (so the forward sees exactly the adapters the host upload path would give it).
template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) {
  return __float2half_rn(x);
}

template <typename T>
__device__ __forceinline__ void cast_f32(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
  const int64_t stride = (int64_t)blockDim.x * gridDim.x;
  const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t n4 = n / 4;
  const float4* s4 = reinterpret_cast<const float4*>(src);
  // Four 2-byte values leave as one 8-byte store, so a warp writes 256 contiguous bytes.
  struct alignas(4 * sizeof(T)) Four {
    T x, y, z, w;
  };
  Four* d4 = reinterpret_cast<Four*>(dst);
  for (int64_t i = first; i < n4; i += stride) {
    const float4 v = s4[i];
    d4[i] = Four{from_f32<T>(v.x), from_f32<T>(v.y), from_f32<T>(v.z), from_f32<T>(v.w)};
  }
  for (int64_t i = 4 * n4 + first; i < n; i += stride) dst[i] = from_f32<T>(src[i]);
}

extern "C" __global__ void cast_f32_bf16(const float* __restrict__ src, __nv_bfloat16* __restrict__ dst, int64_t n) {
  cast_f32(src, dst, n);
}

extern "C" __global__ void cast_f32_f16(const float* __restrict__ src, __half* __restrict__ dst, int64_t n) {
  cast_f32(src, dst, n);
}

// ---------------------------------------------------------------------------------------
// AdamW with 8-bit block-wise moments (bitsandbytes' AdamW8bit), op for op as step_8bit in
// common/src/optim.rs. One CUDA block per state block of at most 256 values of one
// parameter tensor; `blocks` holds 4 int64 per block: first parameter, length, first state
// value, absmax index (-1: the tensor keeps fp32 moments in exp_avg / exp_avg_sq).
//
// An 8-bit block dequantizes its codes (code * absmax), runs adamw_update, takes the
// block's new absmax of each moment (a max, so exact in any reduction order) and stores
// the code nearest to moment / absmax (ties to the lower code; a negative first moment
// that rounds to the zero code moves one code down, keeping its sign, as bitsandbytes'
// kernels do).
constexpr int Q8_BLOCK = 256;

__device__ __forceinline__ float block_max(float x, float* s) {
  s[threadIdx.x] = x;
  __syncthreads();
  for (int half = Q8_BLOCK / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) s[threadIdx.x] = fmaxf(s[threadIdx.x], s[threadIdx.x + half]);
    __syncthreads();
  }
  const float m = s[0];
  __syncthreads();
  return m;
}

// The nearest of the 256 sorted codes to x, as nearest_code in common/src/optim8bit.rs:
// the last code <= x (or the first), then its upper neighbour when strictly closer.
__device__ __forceinline__ int nearest_code(const float* code, float x) {
  int lo = 0, hi = 256;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (code[mid] <= x) lo = mid + 1;
    else hi = mid;
  }
  int idx = lo > 0 ? lo - 1 : 0;
  if (idx < 255 && fabsf(__fsub_rn(x, code[idx + 1])) < fabsf(__fsub_rn(x, code[idx]))) idx += 1;
  return idx;
}

extern "C" __global__ void __launch_bounds__(Q8_BLOCK) adamw_8bit_blockwise(
    float* __restrict__ params,
    const float* __restrict__ grads,
    uint8_t* __restrict__ state1,
    uint8_t* __restrict__ state2,
    float* __restrict__ absmax1,
    float* __restrict__ absmax2,
    float* __restrict__ exp_avg,
    float* __restrict__ exp_avg_sq,
    const float* __restrict__ qmap1,
    const float* __restrict__ qmap2,
    const int64_t* __restrict__ blocks,
    float grad_scale, float decay, float w1, float beta2, float w2, float bc2_sqrt, float eps, float step_size) {
  __shared__ float code1[256], code2[256], red[Q8_BLOCK];
  const int t = threadIdx.x;
  code1[t] = qmap1[t];
  code2[t] = qmap2[t];
  const int64_t* b = blocks + 4 * (int64_t)blockIdx.x;
  const int64_t param = b[0], len = b[1], state = b[2], a = b[3];
  const bool active = t < len;
  if (a < 0) {
    // fp32 moments: uniform over the block, so leaving here skips no barrier.
    if (active) {
      adamw_update(params[param + t], exp_avg[state + t], exp_avg_sq[state + t], grads[param + t], grad_scale, decay,
                   w1, beta2, w2, bc2_sqrt, eps, step_size);
    }
    return;
  }
  __syncthreads();  // the code books are in shared memory
  float p = 0.f, m = 0.f, v = 0.f;
  if (active) {
    p = params[param + t];
    m = __fmul_rn(code1[state1[state + t]], absmax1[a]);
    v = __fmul_rn(code2[state2[state + t]], absmax2[a]);
    adamw_update(p, m, v, grads[param + t], grad_scale, decay, w1, beta2, w2, bc2_sqrt, eps, step_size);
  }
  const float max1 = block_max(active ? fabsf(m) : 0.f, red);
  const float max2 = block_max(active ? fabsf(v) : 0.f, red);
  if (active) {
    params[param + t] = p;
    const float x1 = max1 > 0.f ? __fdiv_rn(m, max1) : 0.f;
    int c1 = nearest_code(code1, x1);
    if (x1 < 0.f && code1[c1] >= 0.f) c1 -= 1;
    state1[state + t] = (uint8_t)c1;
    const float x2 = max2 > 0.f ? __fdiv_rn(v, max2) : 0.f;
    state2[state + t] = (uint8_t)nearest_code(code2, x2);
  }
  // Every thread read the old absmax before the first block_max barrier.
  if (t == 0) {
    absmax1[a] = max1;
    absmax2[a] = max2;
  }
}
