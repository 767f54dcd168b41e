// Vectorised f32 <-> bf16/f32 loads and stores shared by the kernel files.
#pragma once

#include <cuda_bf16.h>

// An aligned group of N elements, so that one copy compiles to one vector access
// (the same device as PyTorch's `aligned_vector`).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Elements per access of at most 16 bytes.
template <typename T, int N>
struct Piece {
  static constexpr int P = (16 / (int)sizeof(T)) < N ? (16 / (int)sizeof(T)) : N;
};

// Reads N consecutive elements at p (aligned to min(16, N * sizeof(T)) bytes) as f32.
template <typename T, int N>
__device__ __forceinline__ void load_f32(const T* __restrict__ p, float (&out)[N]) {
  constexpr int P = Piece<T, N>::P;
#pragma unroll
  for (int j = 0; j < N; j += P) {
    Pack<T, P> pk = *reinterpret_cast<const Pack<T, P>*>(p + j);
#pragma unroll
    for (int k = 0; k < P; k++) out[j + k] = to_f32(pk.v[k]);
  }
}

// Writes N f32 values, rounded to T (round to nearest even), at p (aligned as for load_f32).
template <typename T, int N>
__device__ __forceinline__ void store_f32(T* __restrict__ p, const float (&in)[N]) {
  constexpr int P = Piece<T, N>::P;
#pragma unroll
  for (int j = 0; j < N; j += P) {
    Pack<T, P> pk;
#pragma unroll
    for (int k = 0; k < P; k++) pk.v[k] = from_f32<T>(in[j + k]);
    *reinterpret_cast<Pack<T, P>*>(p + j) = pk;
  }
}
