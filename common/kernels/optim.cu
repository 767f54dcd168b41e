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
