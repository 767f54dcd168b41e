// Causal flash attention (the FlashAttention-2 algorithm), forward and backward, for
// bf16/f16 q [B, Hq, T, D] and k, v [B, Hkv, T, D] (contiguous, D = 64 or 128), with
// grouped-query heads (query head h reads kv head h / (Hq / Hkv)), an optional sliding
// window (query i sees key j iff i - window < j <= i), optional Gemma 2 soft-capping
// (s -> cap * tanh(s / cap) before masking) and optional packed-segment ids (attend only
// within one segment). All products run on the tensor cores (mma.sync m16n8k16, fp32
// accumulators), fed by ldmatrix from shared memory whose rows are padded by 16 bytes so
// that the 8 rows an ldmatrix reads fall in distinct banks.
//
// Forward (flash_fwd_*): one CTA of NW warps per (batch * query head, block of 16 * MT * NW
// query rows); warp w owns MT m-tiles of 16 rows of the block, so a row's softmax
// statistics live in the 4 lanes of one quad. The CTA walks the 64-key tiles its rows can
// see (causal, window, segment ranges), double-buffered with cp.async:
//   S = Q K^T (16 MT x 64 per warp, fp32 registers) -> softcap, mask -> online softmax
//   (running row max m and sum l, log2 domain) -> P, rounded to bf16 and reused in
//   registers as the A operand -> O += P V.
// A warp whose rows see nothing of a tile (above the diagonal, past the window) skips it.
// At the end O /= l, and lse = ln(sum exp(scores)) = m + ln l is kept for the backward. Every row sees at
// least its own key, so l > 0 for every row that is written.
//
// Backward: flash_bwd_pre computes delta_i = rowsum(dO_i * O_i) in fp32 and zeroes the
// fp32 dQ accumulator. flash_bwd_* then runs one CTA of NW warps per (batch * kv head,
// block of 16 * NW keys); warp w owns 16 keys and keeps their dK, dV in registers, so the
// sums over the query heads of a GQA group and over the query blocks need no atomics. The
// CTA loops over (query head of the group) x (64-query block that sees its keys),
// double-buffering Q, dO, lse and delta, and per block (in query chunks of QC columns):
//   S^T = K Q^T -> P^T = exp(S^T - lse) (masked) -> dV += P^T dO
//   dP^T = V dO^T -> dS^T = P^T * (dP^T - delta) (* (1 - tanh^2) under softcap)
//   dK += dS^T Q; dS^T -> shared memory; then dQ(block) += dS K, added into the fp32
//   accumulator with vector atomics (red.global.add.v2.f32).
// The softmax scale multiplies dK at the end and dQ in flash_bwd_dq_convert, which also
// rounds dQ to the input type.
//
// Rows and keys past T are zero-filled in shared memory and masked, never written.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

// Padding, in elements, of every shared-memory row (16 bytes).
constexpr int PAD = 8;
// Keys per forward tile.
constexpr int BC_FWD = 64;
// Queries per backward tile.
constexpr int BR_BWD = 64;
// Rows summarised by one (min, max) entry of the segment-id ranges.
constexpr int SEG_BLOCK = 64;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

template <bool BF16>
struct Elem;

template <>
struct Elem<true> {
  using T = __nv_bfloat16;
  // Two floats as one operand register; the first goes to the low half (lower column).
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t w) {
    __nv_bfloat162 v = *reinterpret_cast<__nv_bfloat162*>(&w);
    return __bfloat1622float2(v);
  }
};

template <>
struct Elem<false> {
  using T = __half;
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t w) {
    __half2 v = *reinterpret_cast<__half2*>(&w);
    return __half22float2(v);
  }
};

// c += a * b for a 16x16 A (row-major fragment), a 16x8 B (column-major fragment).
template <bool BF16>
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, and register i
// of lane l receives row l/4, columns 2(l%4), 2(l%4)+1 of matrix i.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// The same with each matrix transposed.
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// 16-byte asynchronous copy; with valid == false the destination is zero-filled and the
// source (which must still be a valid address) is not read.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(valid ? 4 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// *p += a, *(p + 1) += b, atomically; one vector reduction on sm_90 (p 8-byte aligned).
__device__ __forceinline__ void red_add_v2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

// Copies rows [row0, row0 + ROWS) of one head's [t, D] matrix `g` into shared rows of
// stride D + PAD; rows at or past t are zero-filled.
template <int ROWS, int D, int NT, typename T>
__device__ __forceinline__ void load_rows(T* s, const T* g, int row0, int t, int tid) {
  constexpr int CPR = D / 8;  // 16-byte chunks per row
  static_assert((ROWS * CPR) % NT == 0, "tile copy must divide evenly over the threads");
#pragma unroll
  for (int it = 0; it < ROWS * CPR / NT; ++it) {
    const int c = tid + it * NT;
    const int r = c / CPR, col = (c % CPR) * 8;
    const int row = row0 + r;
    const bool ok = row < t;
    cp_async16(s + r * (D + PAD) + col, g + (size_t)(ok ? row : 0) * D + col, ok);
  }
}

// Whether rows [r0, r0 + nr) and [c0, c0 + nc) of batch row b can share a segment id,
// judged from the (min, max) id of each SEG_BLOCK rows: disjoint ranges share none.
__device__ __forceinline__ bool seg_overlap(const uint32_t* ranges, int nblk, int b, int r0, int nr, int c0,
                                            int nc, int t) {
  const uint32_t* rb = ranges + (size_t)b * nblk * 2;
  uint32_t rmin = 0xffffffffu, rmax = 0, cmin = 0xffffffffu, cmax = 0;
  for (int k = r0 / SEG_BLOCK; k <= (min(t, r0 + nr) - 1) / SEG_BLOCK; ++k) {
    rmin = min(rmin, rb[2 * k]);
    rmax = max(rmax, rb[2 * k + 1]);
  }
  for (int k = c0 / SEG_BLOCK; k <= (min(t, c0 + nc) - 1) / SEG_BLOCK; ++k) {
    cmin = min(cmin, rb[2 * k]);
    cmax = max(cmax, rb[2 * k + 1]);
  }
  return rmin <= cmax && cmin <= rmax;
}

__device__ __forceinline__ bool visible(int i, int j, int t, int window, bool same_segment) {
  return j <= i && i < t && (window <= 0 || i - j < window) && same_segment;
}

template <int D, int NW, int MT, bool BF16, bool SOFTCAP>
__device__ __forceinline__ void flash_fwd(const typename Elem<BF16>::T* __restrict__ q,
                                          const typename Elem<BF16>::T* __restrict__ k,
                                          const typename Elem<BF16>::T* __restrict__ v,
                                          typename Elem<BF16>::T* __restrict__ o, float* __restrict__ lse,
                                          const uint32_t* __restrict__ seg, const uint32_t* __restrict__ seg_ranges,
                                          int has_seg, int hq, int hkv, int t, int window, int seg_blocks,
                                          float scale, float softcap) {
  using E = Elem<BF16>;
  using T = typename E::T;
  // Each warp owns MT m-tiles of 16 rows: the K and V fragments it reads from shared
  // memory feed MT products each.
  constexpr int WR = 16 * MT, BR = WR * NW, BC = BC_FWD, NT = 32 * NW, LD = D + PAD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BR][LD]
  T* sK = sQ + BR * LD;                     // [2][BC][LD]
  T* sV = sK + 2 * BC * LD;                 // [2][BC][LD]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int bh = blockIdx.x, b = bh / hq, h = bh % hq;
  const int kvh = h / (hq / hkv);
  // The heaviest query blocks (last rows, most keys) first.
  const int nqb = (t + BR - 1) / BR;
  const int q0 = (nqb - 1 - (int)blockIdx.y) * BR;
  const T* qh = q + (size_t)bh * t * D;
  const T* kh = k + ((size_t)b * hkv + kvh) * t * D;
  const T* vh = v + ((size_t)b * hkv + kvh) * t * D;
  const uint32_t* segb = seg + (size_t)b * t;

  const int q_last = min(t, q0 + BR) - 1;
  const int kb_lo = window > 0 ? max(0, q0 - window + 1) / BC : 0;
  const int kb_hi = q_last / BC + 1;
  auto needed = [&](int kb) {
    return !has_seg || seg_overlap(seg_ranges, seg_blocks, b, q0, BR, kb * BC, BC, t);
  };

  const int r0w = q0 + warp * WR;  // first row of this warp
  // Thread rows: r0w + 16 * mt + g + 8 * r.
  uint32_t seg_i[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = r0w + 16 * mt + g + 8 * r;
      seg_i[mt][r] = has_seg && i < t ? segb[i] : 0;
    }
  }
  // Scores are kept in "score units" (the raw q.k without softcap, cap * tanh(...) with
  // it); exp(score) = exp2(score * f).
  const float f = SOFTCAP ? LOG2E : scale * LOG2E;

  load_rows<BR, D, NT>(sQ, qh, q0, t, tid);
  int kb = kb_lo;
  while (kb < kb_hi && !needed(kb)) ++kb;
  if (kb < kb_hi) {
    load_rows<BC, D, NT>(sK, kh, kb * BC, t, tid);
    load_rows<BC, D, NT>(sV, vh, kb * BC, t, tid);
  }
  cp_async_commit();

  float acc_o[MT][D / 8][4];
  float row_max[MT][2], row_sum[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n) acc_o[mt][n][0] = acc_o[mt][n][1] = acc_o[mt][n][2] = acc_o[mt][n][3] = 0.f;
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }

  int stage = 0;
  while (kb < kb_hi) {
    int next = kb + 1;
    while (next < kb_hi && !needed(next)) ++next;
    if (next < kb_hi) {
      load_rows<BC, D, NT>(sK + (stage ^ 1) * BC * LD, kh, next * BC, t, tid);
      load_rows<BC, D, NT>(sV + (stage ^ 1) * BC * LD, vh, next * BC, t, tid);
    }
    cp_async_commit();
    cp_async_wait<1>();  // everything but the tile just issued has landed
    __syncthreads();

    const int k0 = kb * BC;
    const T* sKs = sK + stage * BC * LD;
    const T* sVs = sV + stage * BC * LD;
    // Warp-uniform: does any row of this warp see any key of the tile?
    const bool active = r0w < t && k0 <= r0w + WR - 1 && (window <= 0 || r0w - (k0 + BC - 1) < window);
    if (active) {
      float s[MT][BC / 8][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int n = 0; n < BC / 8; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
      }
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          ldsm_x4(a[mt], sQ + (warp * WR + mt * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int np = 0; np < BC / 16; ++np) {
          uint32_t bb[4];
          ldsm_x4(bb, sKs + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma<BF16>(s[mt][2 * np], a[mt], bb[0], bb[1]);
            mma<BF16>(s[mt][2 * np + 1], a[mt], bb[2], bb[3]);
          }
        }
      }
      // Masking is needed where the tile crosses the diagonal, the window edge, T or a
      // segment boundary; elsewhere every pair is visible.
      const bool need_mask = has_seg || k0 + BC - 1 > r0w || k0 + BC > t || r0w + WR > t ||
                             (window > 0 && r0w + WR - 1 - k0 >= window);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int n = 0; n < BC / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float x = s[mt][n][e];
            if constexpr (SOFTCAP) x = softcap * tanhf(x * scale / softcap);
            if (need_mask) {
              const int i = r0w + 16 * mt + g + 8 * (e >> 1);
              const int j = k0 + n * 8 + 2 * t4 + (e & 1);
              const bool same = !has_seg || (j < t && segb[j] == seg_i[mt][e >> 1]);
              if (!visible(i, j, t, window, same)) x = -INFINITY;
            }
            s[mt][n][e] = x;
          }
        }
        // Online softmax, one pass per owned row (r = 0: row g, r = 1: row g + 8).
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float mx = -INFINITY;
#pragma unroll
          for (int n = 0; n < BC / 8; ++n) mx = fmaxf(mx, fmaxf(s[mt][n][2 * r], s[mt][n][2 * r + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          const float m_new = fmaxf(row_max[mt][r], mx);
          // A row that has seen only masked keys keeps m = -inf; subtracting 0 instead
          // keeps exp2(-inf - m) at 0 rather than NaN.
          const float m_f = m_new == -INFINITY ? 0.f : m_new * f;
          const float alpha = exp2f(row_max[mt][r] * f - m_f);
          row_max[mt][r] = m_new;
          float sum = 0.f;
#pragma unroll
          for (int n = 0; n < BC / 8; ++n) {
            s[mt][n][2 * r] = exp2f(fmaf(s[mt][n][2 * r], f, -m_f));
            s[mt][n][2 * r + 1] = exp2f(fmaf(s[mt][n][2 * r + 1], f, -m_f));
            sum += s[mt][n][2 * r] + s[mt][n][2 * r + 1];
          }
          // Lane-partial sums; the quad's lanes are added once at the end.
          row_sum[mt][r] = row_sum[mt][r] * alpha + sum;
#pragma unroll
          for (int n = 0; n < D / 8; ++n) {
            acc_o[mt][n][2 * r] *= alpha;
            acc_o[mt][n][2 * r + 1] *= alpha;
          }
        }
      }
      // O += P V; the accumulator layout of two adjacent 8-key tiles is the A layout of
      // one 16-key step.
#pragma unroll
      for (int kc = 0; kc < BC / 16; ++kc) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          a[mt][0] = E::pack(s[mt][2 * kc][0], s[mt][2 * kc][1]);
          a[mt][1] = E::pack(s[mt][2 * kc][2], s[mt][2 * kc][3]);
          a[mt][2] = E::pack(s[mt][2 * kc + 1][0], s[mt][2 * kc + 1][1]);
          a[mt][3] = E::pack(s[mt][2 * kc + 1][2], s[mt][2 * kc + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t bb[4];
          ldsm_x4_t(bb, sVs + (kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dp * 16 + (lane >> 4) * 8);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma<BF16>(acc_o[mt][2 * dp], a[mt], bb[0], bb[1]);
            mma<BF16>(acc_o[mt][2 * dp + 1], a[mt], bb[2], bb[3]);
          }
        }
      }
    }
    __syncthreads();  // the next iteration's copies overwrite this stage
    kb = next;
    stage ^= 1;
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_sum[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int i = r0w + 16 * mt + g + 8 * r;
      if (i < t) {
        const float inv = 1.f / l;
        T* orow = o + ((size_t)bh * t + i) * D + 2 * t4;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          *reinterpret_cast<uint32_t*>(orow + n * 8) =
              E::pack(acc_o[mt][n][2 * r] * inv, acc_o[mt][n][2 * r + 1] * inv);
        }
        // lse in natural units: m * f / log2(e) + ln(l).
        if (t4 == 0) lse[(size_t)bh * t + i] = row_max[mt][r] * f * LN2 + logf(l);
      }
    }
  }
}

template <int D, int NW, int QC, bool BF16, bool SOFTCAP>
__device__ __forceinline__ void flash_bwd(const typename Elem<BF16>::T* __restrict__ q,
                                          const typename Elem<BF16>::T* __restrict__ k,
                                          const typename Elem<BF16>::T* __restrict__ v,
                                          const typename Elem<BF16>::T* __restrict__ dout,
                                          const float* __restrict__ lse, const float* __restrict__ delta,
                                          float* __restrict__ dq_acc, typename Elem<BF16>::T* __restrict__ dk,
                                          typename Elem<BF16>::T* __restrict__ dv, const uint32_t* __restrict__ seg,
                                          const uint32_t* __restrict__ seg_ranges, int has_seg, int hq, int hkv,
                                          int t, int window, int seg_blocks, float scale, float softcap) {
  using E = Elem<BF16>;
  using T = typename E::T;
  constexpr int BC = 16 * NW, BR = BR_BWD, NT = 32 * NW, LD = D + PAD, LDS = BR + PAD;
  static_assert(BR % QC == 0 && QC % 16 == 0, "query chunks must tile the block in steps of 16");
  // dQ = dS K: the BR rows split into BR / 16 row groups, the D columns over the rest of the warps.
  constexpr int RG = BR / 16;
  static_assert(NW % RG == 0, "dQ needs a whole number of warps per row group");
  constexpr int DW = D / (NW / RG);
  static_assert(DW % 32 == 0, "dQ column chunks are 32 wide");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);  // [BC][LD]
  T* sV = sK + BC * LD;                     // [BC][LD]
  T* sQ = sV + BC * LD;                     // [2][BR][LD]
  T* sdO = sQ + 2 * BR * LD;                // [2][BR][LD]
  T* sdS = sdO + 2 * BR * LD;               // [BC][LDS], dS^T: keys x queries
  float* sLse = reinterpret_cast<float*>(sdS + BC * LDS);  // [2][BR]
  float* sDelta = sLse + 2 * BR;                            // [2][BR]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int bkv = blockIdx.x, b = bkv / hkv, kvh = bkv % hkv;
  const int group = hq / hkv;
  // blockIdx.y = 0 is the first key block, which the most queries see: heaviest first.
  const int k0 = blockIdx.y * BC;
  const T* kh = k + (size_t)bkv * t * D;
  const T* vh = v + (size_t)bkv * t * D;
  const uint32_t* segb = seg + (size_t)b * t;

  const int nqb = (t + BR - 1) / BR;
  const int qb_lo = k0 / BR;
  // The last query that sees key k0 + BC - 1 under the window is k0 + BC - 2 + window.
  const int qb_hi = window > 0 ? min(nqb, (k0 + BC - 2 + window) / BR + 1) : nqb;
  const int nq = qb_hi - qb_lo;
  const int n_items = group * nq;
  auto needed = [&](int it) {
    return !has_seg || seg_overlap(seg_ranges, seg_blocks, b, (qb_lo + it % nq) * BR, BR, k0, BC, t);
  };
  auto load_item = [&](int it, int st) {
    const int hqi = kvh * group + it / nq;
    const int q0 = (qb_lo + it % nq) * BR;
    const size_t bhq = (size_t)b * hq + hqi;
    load_rows<BR, D, NT>(sQ + st * BR * LD, q + bhq * t * D, q0, t, tid);
    load_rows<BR, D, NT>(sdO + st * BR * LD, dout + bhq * t * D, q0, t, tid);
    for (int r = tid; r < BR; r += NT) {
      const int i = q0 + r;
      const bool ok = i < t;
      const size_t at = bhq * t + (ok ? i : 0);
      cp_async4(sLse + st * BR + r, lse + at, ok);
      cp_async4(sDelta + st * BR + r, delta + at, ok);
    }
  };

  const int kw0 = k0 + warp * 16;  // first key of this warp
  const int j0 = kw0 + g, j1 = j0 + 8;
  uint32_t seg_j0 = 0, seg_j1 = 0;
  if (has_seg) {
    seg_j0 = j0 < t ? segb[j0] : 0;
    seg_j1 = j1 < t ? segb[j1] : 0;
  }
  const float scale_log2 = scale * LOG2E;

  load_rows<BC, D, NT>(sK, kh, k0, t, tid);
  load_rows<BC, D, NT>(sV, vh, k0, t, tid);
  int it = 0;
  while (it < n_items && !needed(it)) ++it;
  if (it < n_items) load_item(it, 0);
  cp_async_commit();

  float acc_dk[D / 8][4], acc_dv[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[n][e] = acc_dv[n][e] = 0.f;
  }

  int stage = 0;
  while (it < n_items) {
    int next = it + 1;
    while (next < n_items && !needed(next)) ++next;
    if (next < n_items) load_item(next, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const int q0 = (qb_lo + it % nq) * BR;
    const size_t bhq = (size_t)b * hq + kvh * group + it / nq;
    const T* sQs = sQ + stage * BR * LD;
    const T* sdOs = sdO + stage * BR * LD;
    const float* sLs = sLse + stage * BR;
    const float* sDs = sDelta + stage * BR;

#pragma unroll 1
    for (int c = 0; c < BR; c += QC) {
      const int qc0 = q0 + c;
      // Warp-uniform: does any key of this warp see any query of the chunk?
      const bool active = kw0 < t && qc0 < t && qc0 + QC - 1 >= kw0 && (window <= 0 || qc0 - (kw0 + 15) < window);
      if (!active) {
        // Zero this warp's dS^T rows of the chunk: dQ below reads every row.
        for (int x = lane; x < 16 * QC / 2; x += 32) {
          const int r = x / (QC / 2), col = (x % (QC / 2)) * 2;
          *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + r) * LDS + c + col) = 0u;
        }
        continue;
      }
      // S^T = K Q^T for this warp's 16 keys and the chunk's QC queries.
      float st[QC / 8][4];
#pragma unroll
      for (int n = 0; n < QC / 8; ++n) st[n][0] = st[n][1] = st[n][2] = st[n][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[4];
        ldsm_x4(a, sK + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int np = 0; np < QC / 16; ++np) {
          uint32_t bb[4];
          ldsm_x4(bb, sQs + (c + np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
          mma<BF16>(st[2 * np], a, bb[0], bb[1]);
          mma<BF16>(st[2 * np + 1], a, bb[2], bb[3]);
        }
      }
      const bool need_mask = has_seg || kw0 + 15 > qc0 || qc0 + QC > t || kw0 + 16 > t ||
                             (window > 0 && qc0 + QC - 1 - kw0 >= window);
      // P^T = exp(S^T - lse), masked. Under softcap, tanh is kept for the chain rule.
      float th[SOFTCAP ? QC / 8 : 1][4];
#pragma unroll
      for (int n = 0; n < QC / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = c + n * 8 + 2 * t4 + (e & 1);
          float x;
          if constexpr (SOFTCAP) {
            const float tt = tanhf(st[n][e] * scale / softcap);
            th[n][e] = tt;
            x = softcap * tt * LOG2E;
          } else {
            x = st[n][e] * scale_log2;
          }
          float p = exp2f(x - sLs[col] * LOG2E);
          if (need_mask) {
            const int i = q0 + col;
            const int j = e < 2 ? j0 : j1;
            const bool same = !has_seg || (i < t && segb[i] == (e < 2 ? seg_j0 : seg_j1));
            if (!visible(i, j, t, window, same)) p = 0.f;
          }
          st[n][e] = p;
        }
      }
      // dV += P^T dO
#pragma unroll
      for (int kc = 0; kc < QC / 16; ++kc) {
        const uint32_t a[4] = {E::pack(st[2 * kc][0], st[2 * kc][1]), E::pack(st[2 * kc][2], st[2 * kc][3]),
                               E::pack(st[2 * kc + 1][0], st[2 * kc + 1][1]),
                               E::pack(st[2 * kc + 1][2], st[2 * kc + 1][3])};
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t bb[4];
          ldsm_x4_t(bb, sdOs + (c + kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dp * 16 + (lane >> 4) * 8);
          mma<BF16>(acc_dv[2 * dp], a, bb[0], bb[1]);
          mma<BF16>(acc_dv[2 * dp + 1], a, bb[2], bb[3]);
        }
      }
      // dP^T = V dO^T
      float dpt[QC / 8][4];
#pragma unroll
      for (int n = 0; n < QC / 8; ++n) dpt[n][0] = dpt[n][1] = dpt[n][2] = dpt[n][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[4];
        ldsm_x4(a, sV + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int np = 0; np < QC / 16; ++np) {
          uint32_t bb[4];
          ldsm_x4(bb, sdOs + (c + np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
          mma<BF16>(dpt[2 * np], a, bb[0], bb[1]);
          mma<BF16>(dpt[2 * np + 1], a, bb[2], bb[3]);
        }
      }
      // dS^T = P^T * (dP^T - delta) (* d softcap / d s)
#pragma unroll
      for (int n = 0; n < QC / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = c + n * 8 + 2 * t4 + (e & 1);
          float ds = st[n][e] * (dpt[n][e] - sDs[col]);
          if constexpr (SOFTCAP) ds *= 1.f - th[n][e] * th[n][e];
          dpt[n][e] = ds;
        }
      }
      // dK += dS^T Q, and dS^T to shared memory for dQ.
#pragma unroll
      for (int kc = 0; kc < QC / 16; ++kc) {
        const uint32_t a[4] = {E::pack(dpt[2 * kc][0], dpt[2 * kc][1]), E::pack(dpt[2 * kc][2], dpt[2 * kc][3]),
                               E::pack(dpt[2 * kc + 1][0], dpt[2 * kc + 1][1]),
                               E::pack(dpt[2 * kc + 1][2], dpt[2 * kc + 1][3])};
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t bb[4];
          ldsm_x4_t(bb, sQs + (c + kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dp * 16 + (lane >> 4) * 8);
          mma<BF16>(acc_dk[2 * dp], a, bb[0], bb[1]);
          mma<BF16>(acc_dk[2 * dp + 1], a, bb[2], bb[3]);
        }
        T* row_g = sdS + (warp * 16 + g) * LDS + c + kc * 16 + 2 * t4;
        *reinterpret_cast<uint32_t*>(row_g) = a[0];
        *reinterpret_cast<uint32_t*>(row_g + 8 * LDS) = a[1];
        *reinterpret_cast<uint32_t*>(row_g + 8) = a[2];
        *reinterpret_cast<uint32_t*>(row_g + 8 * LDS + 8) = a[3];
      }
    }
    __syncthreads();  // dS^T complete

    // dQ(block) += dS K: warp -> row group rg (16 queries), columns [dsp * DW, dsp * DW + DW).
    {
      const int rg = warp % RG, dsp = warp / RG;
#pragma unroll 1
      for (int dc = 0; dc < DW; dc += 32) {
        float acc[4][4];
#pragma unroll
        for (int n = 0; n < 4; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
#pragma unroll
        for (int kc = 0; kc < BC / 16; ++kc) {
          uint32_t a[4];
          // A = dS (queries x keys) read transposed out of dS^T (keys x queries).
          ldsm_x4_t(a, sdS + (kc * 16 + (lane & 7) + (lane >> 4) * 8) * LDS + rg * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
          for (int dp = 0; dp < 2; ++dp) {
            uint32_t bb[4];
            ldsm_x4_t(bb, sK + (kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dsp * DW + dc + dp * 16 +
                              (lane >> 4) * 8);
            mma<BF16>(acc[2 * dp], a, bb[0], bb[1]);
            mma<BF16>(acc[2 * dp + 1], a, bb[2], bb[3]);
          }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int i = q0 + rg * 16 + g + 8 * r;
          if (i < t) {
            float* row = dq_acc + (bhq * t + i) * D + dsp * DW + dc + 2 * t4;
#pragma unroll
            for (int n = 0; n < 4; ++n) red_add_v2(row + n * 8, acc[n][2 * r], acc[n][2 * r + 1]);
          }
        }
      }
    }
    __syncthreads();  // the next iteration's copies overwrite this stage, and dS^T is rewritten
    it = next;
    stage ^= 1;
  }
  cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = r ? j1 : j0;
    if (j < t) {
      T* dkr = dk + ((size_t)bkv * t + j) * D + 2 * t4;
      T* dvr = dv + ((size_t)bkv * t + j) * D + 2 * t4;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        *reinterpret_cast<uint32_t*>(dkr + n * 8) = E::pack(acc_dk[n][2 * r] * scale, acc_dk[n][2 * r + 1] * scale);
        *reinterpret_cast<uint32_t*>(dvr + n * 8) = E::pack(acc_dv[n][2 * r], acc_dv[n][2 * r + 1]);
      }
    }
  }
}

// delta_i = sum_d dO[i, d] * O[i, d] over `rows` rows of D, one warp per row; also zeroes
// the row of the fp32 dQ accumulator.
template <int D, bool BF16>
__device__ __forceinline__ void flash_bwd_pre(const typename Elem<BF16>::T* __restrict__ o,
                                              const typename Elem<BF16>::T* __restrict__ dout,
                                              float* __restrict__ delta, float* __restrict__ dq_acc, long long rows) {
  using E = Elem<BF16>;
  const long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const uint32_t* o2 = reinterpret_cast<const uint32_t*>(o + row * D);
  const uint32_t* d2 = reinterpret_cast<const uint32_t*>(dout + row * D);
  float sum = 0.f;
#pragma unroll
  for (int x = lane; x < D / 2; x += 32) {
    const float2 a = E::unpack(o2[x]), b = E::unpack(d2[x]);
    sum += a.x * b.x + a.y * b.y;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) delta[row] = sum;
  float2* acc = reinterpret_cast<float2*>(dq_acc + row * D);
#pragma unroll
  for (int x = lane; x < D / 2; x += 32) acc[x] = make_float2(0.f, 0.f);
}

// dq = scale * acc rounded to the input type, 4 elements per thread (n % 4 == 0).
template <bool BF16>
__device__ __forceinline__ void flash_bwd_dq_convert(const float* __restrict__ acc,
                                                     typename Elem<BF16>::T* __restrict__ dq, long long n,
                                                     float scale) {
  using E = Elem<BF16>;
  for (long long x = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 4; x < n;
       x += (long long)gridDim.x * blockDim.x * 4) {
    const float4 a = *reinterpret_cast<const float4*>(acc + x);
    uint2 w;
    w.x = E::pack(a.x * scale, a.y * scale);
    w.y = E::pack(a.z * scale, a.w * scale);
    *reinterpret_cast<uint2*>(dq + x) = w;
  }
}

}  // namespace

// (min, max) segment id of each SEG_BLOCK positions of each batch row: ranges[b][blk][2].
extern "C" __global__ void flash_seg_ranges(const uint32_t* __restrict__ seg, uint32_t* __restrict__ ranges,
                                            int batch, int t, int nblk) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  if (x >= batch * nblk) return;
  const int b = x / nblk, blk = x % nblk;
  const uint32_t* s = seg + (size_t)b * t;
  uint32_t lo = 0xffffffffu, hi = 0;
  for (int j = blk * SEG_BLOCK; j < min(t, (blk + 1) * SEG_BLOCK); ++j) {
    lo = min(lo, s[j]);
    hi = max(hi, s[j]);
  }
  ranges[2 * x] = lo;
  ranges[2 * x + 1] = hi;
}

// NAME(args) wrappers: MINB is the minimum of resident CTAs per SM asked of the register allocator.
#define FLASH_FWD(NAME, D, NW, MT, MINB, BF16, SOFTCAP)                                                       \
  extern "C" __global__ void __launch_bounds__(NW * 32, MINB) NAME(                                           \
      const Elem<BF16>::T* q, const Elem<BF16>::T* k, const Elem<BF16>::T* v, Elem<BF16>::T* o, float* lse, \
      const uint32_t* seg, const uint32_t* seg_ranges, int has_seg, int hq, int hkv, int t, int window,       \
      int seg_blocks, float scale, float softcap) {                                                           \
    flash_fwd<D, NW, MT, BF16, SOFTCAP>(q, k, v, o, lse, seg, seg_ranges, has_seg, hq, hkv, t, window,        \
                                        seg_blocks, scale, softcap);                                          \
  }

#define FLASH_BWD(NAME, D, NW, QC, MINB, BF16, SOFTCAP)                                                              \
  extern "C" __global__ void __launch_bounds__(NW * 32, MINB) NAME(                                           \
      const Elem<BF16>::T* q, const Elem<BF16>::T* k, const Elem<BF16>::T* v, const Elem<BF16>::T* dout,    \
      const float* lse, const float* delta, float* dq_acc, Elem<BF16>::T* dk, Elem<BF16>::T* dv,              \
      const uint32_t* seg, const uint32_t* seg_ranges, int has_seg, int hq, int hkv, int t, int window,       \
      int seg_blocks, float scale, float softcap) {                                                           \
    flash_bwd<D, NW, QC, BF16, SOFTCAP>(q, k, v, dout, lse, delta, dq_acc, dk, dv, seg, seg_ranges, has_seg, \
                                        hq, hkv, t, window, seg_blocks, scale, softcap);                      \
  }

#define FLASH_PRE(NAME, D, BF16)                                                                             \
  extern "C" __global__ void __launch_bounds__(256) NAME(const Elem<BF16>::T* o, const Elem<BF16>::T* dout, \
                                                         float* delta, float* dq_acc, long long rows) {      \
    flash_bwd_pre<D, BF16>(o, dout, delta, dq_acc, rows);                                                   \
  }

// Production shapes; flash.rs launches them with the matching grids and shared memory.
// Forward: 4 warps of one m-tile (64 query rows per CTA). Backward: D = 64 with 4 warps
// (64 keys) and query chunks of 64, D = 128 with 8 warps (128 keys) and chunks of 32.
// These were the fastest shapes without register spills on an H200 (B=2, Hq=32, Hkv=8,
// T=2048, D=128); 2 m-tiles per warp or 8 forward warps with 2 CTAs per SM spill.
#define FLASH_ALL(D, BWD_NW, BWD_QC, BF16, SUFFIX)                                      \
  FLASH_FWD(flash_fwd_d##D##_##SUFFIX, D, 4, 1, 1, BF16, false)                         \
  FLASH_FWD(flash_fwd_d##D##_##SUFFIX##_softcap, D, 4, 1, 1, BF16, true)                \
  FLASH_BWD(flash_bwd_d##D##_##SUFFIX, D, BWD_NW, BWD_QC, 1, BF16, false)               \
  FLASH_BWD(flash_bwd_d##D##_##SUFFIX##_softcap, D, BWD_NW, BWD_QC, 1, BF16, true)
FLASH_ALL(64, 4, 64, true, bf16)
FLASH_ALL(128, 8, 32, true, bf16)
FLASH_ALL(64, 4, 64, false, f16)
FLASH_ALL(128, 8, 32, false, f16)

FLASH_PRE(flash_bwd_pre_d64_bf16, 64, true)
FLASH_PRE(flash_bwd_pre_d128_bf16, 128, true)
FLASH_PRE(flash_bwd_pre_d64_f16, 64, false)
FLASH_PRE(flash_bwd_pre_d128_f16, 128, false)

extern "C" __global__ void flash_bwd_dq_convert_bf16(const float* acc, __nv_bfloat16* dq, long long n, float scale) {
  flash_bwd_dq_convert<true>(acc, dq, n, scale);
}
extern "C" __global__ void flash_bwd_dq_convert_f16(const float* acc, __half* dq, long long n, float scale) {
  flash_bwd_dq_convert<false>(acc, dq, n, scale);
}
