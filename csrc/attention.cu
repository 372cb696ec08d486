// Split-K ("flash-decoding") attention for few query rows against a one-head KV cache, head dim
// 256, on the tensor cores (mma.sync m16n8k16, sm_80 and newer: every FlashRT target).
//
// The shape it is for: Pi0/Pi0.5's action expert attends 50 tokens x 8 heads = 400 query rows
// (heads fold into rows since all heads share the single KV head) to a ~760-key cache, 180 times
// per inference. That is ~1.2 MB of bytes and ~0.3 GFLOP: about 1 us of work. A flash-attention
// kernel that gives each 64-row query tile one CTA uses 7 of 132 SMs and walks all keys serially.
// Here the keys are split too: grid = (query tiles of 16 W rows) x (splits), each CTA runs the
// online-softmax flash loop over its slice of keys, and a small second kernel merges the splits
// (the standard log-sum-exp merge). Two kernels and no global semaphores, so concurrent launches
// on several streams (several models on one GPU) never share state.
//
// CTA = W warps (W = 2 or 4, a template parameter: fewer warps per CTA give more CTAs to fill
// the SMs, more warps share each K/V tile load; 4 measured faster on the H100); warp w owns query rows [16w, 16w + 16) of the
// tile and the full 256-wide output accumulator for them (32 n8-tiles x 4 fp32 = 128 registers
// per thread). Shared memory: the Q tile (16 W x 256) and two stages of 32-key K and V tiles,
// loaded with cp.async (16-byte chunks, zero-filled outside the valid keys so masked rows of V
// cannot inject NaN), all rows XOR-swizzled in 16-byte units so ldmatrix reads are bank-conflict
// free. At most 96 KB, within the opt-in limit of every target (99 KB on sm_89/sm_120).
//
// Per 32-key tile, per warp: S = Q K^T (16 k-steps x 4 n-tiles of mma), mask, online softmax in
// the log2 domain (running max m and sum l per row, quad shuffles), P rounded to the dtype and
// reused straight from the accumulator registers as the A operand of O += P V (V through
// ldmatrix.trans). Logits, softmax and accumulation are fp32, like FlashAttention-2.

#include "common.cuh"
#include "kernels.h"
#include "mma.cuh"

#include <cfloat>

namespace flashrt {
namespace {

constexpr int kD = 256;           // head dim
constexpr int kBN = 32;           // keys per tile
constexpr int kChunks = kD * 2 / 16;  // 16-byte chunks per 256-wide 2-byte row: 32
constexpr float kLog2e = 1.4426950408889634f;
// W warps per CTA own 16 query rows each: the CTA's query tile is 16 W rows.
template <int W> constexpr int smem_bytes() { return (16 * W + 4 * kBN) * kD * 2 + 2 * kBN; }  // Q, 2x(K, V), flags

// Offset (in 16-byte chunks) of chunk `c` of row `r` in a swizzled tile: the low 3 bits of the
// chunk index are XORed with the row, so the 8 rows an ldmatrix phase reads hit 8 different
// 4-bank groups.
__device__ __forceinline__ int swz(int r, int c) { return r * kChunks + (c ^ (r & 7)); }

// Number of valid keys and of valid query rows, read on the device (one graph serves any length).
__device__ __forceinline__ int valid_keys(const int32_t* cu_k, int n_keys) {
  return cu_k != nullptr ? max(0, min(cu_k[1], n_keys)) : n_keys;
}
__device__ __forceinline__ int valid_rows(const int32_t* cu_q, int rows) {
  return cu_q != nullptr ? max(0, min(cu_q[1], rows)) : rows;
}

template <typename T, int W>
__global__ void __launch_bounds__(32 * W)
attention_partial_kernel(const T* __restrict__ q, int64_t q_stride, const T* __restrict__ k, int64_t k_stride,
                         const T* __restrict__ v, int64_t v_stride, T* __restrict__ out, int64_t out_stride,
                         int rows, int n_keys, const int32_t* __restrict__ cu_q, const int32_t* __restrict__ cu_k,
                         const bool* __restrict__ key_mask, float* __restrict__ part_o, float* __restrict__ part_ml,
                         const float* __restrict__ inv_scale, int fresh_tail) {
  // fresh_tail >= 0: only the last fresh_tail valid keys (the query tokens' own K/V, just written by
  // rope) come from the kernel ahead; cu_k, cu_q, the key mask and the keys before them are older.
  // So a CTA whose first tile holds none of them loads it before griddepcontrol.wait, while the
  // kernel ahead drains. fresh_tail < 0: every input may come from the kernel ahead.
  pdl_launch_dependents();
  if (fresh_tail < 0) pdl_wait();
  constexpr int kBM = 16 * W, kThreads = 32 * W;
  extern __shared__ __align__(16) unsigned char smem[];
  uint4* Qs = reinterpret_cast<uint4*>(smem);
  uint4* Ks = Qs + kBM * kChunks;         // [2][kBN * kChunks]
  uint4* Vs = Ks + 2 * kBN * kChunks;     // [2][kBN * kChunks]
  unsigned char* flags = reinterpret_cast<unsigned char*>(Vs + 2 * kBN * kChunks);  // [2][kBN]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int q0 = blockIdx.x * kBM;
  const int splits = gridDim.y, split = blockIdx.y;
  const int nk = valid_keys(cu_k, n_keys);
  const int nq = valid_rows(cu_q, rows);

  // This CTA's keys: splits of equal size, in whole tiles.
  const int per = ((nk + splits - 1) / splits + kBN - 1) / kBN * kBN;
  const int kbeg = min(split * per, nk), kend = min(kbeg + per, nk);
  const int ntiles = (kend - kbeg + kBN - 1) / kBN;

  auto load_tile = [&](int tile, int stage) {
    const int kb = kbeg + tile * kBN;
    uint4* ks = Ks + stage * kBN * kChunks;
    uint4* vs = Vs + stage * kBN * kChunks;
    for (int i = tid; i < kBN * kChunks; i += kThreads) {
      const int r = i / kChunks, c = i % kChunks;
      const int key = kb + r;
      const bool ok = key < kend && (key_mask == nullptr || key_mask[key]);
      cp_async16(ks + swz(r, c), ok ? k + (int64_t)key * k_stride + c * 8 : k, ok);
      cp_async16(vs + swz(r, c), ok ? v + (int64_t)key * v_stride + c * 8 : v, ok);
    }
    if (tid < kBN) {
      const int key = kb + tid;
      flags[stage * kBN + tid] = key < kend && (key_mask == nullptr || key_mask[key]);
    }
  };
  const bool early = fresh_tail >= 0 && ntiles > 0 && kbeg + kBN <= nk - fresh_tail;
  if (fresh_tail >= 0) {
    if (early) load_tile(0, 0);
    pdl_wait();
  }
  // Q tile -> shared (rows past `rows` zero-filled).
  for (int i = tid; i < kBM * kChunks; i += kThreads) {
    const int r = i / kChunks, c = i % kChunks;
    const bool ok = q0 + r < rows;
    cp_async16(Qs + swz(r, c), ok ? q + (int64_t)(q0 + r) * q_stride + c * 8 : q, ok);
  }
  if (ntiles > 0 && !early) load_tile(0, 0);
  cp_async_commit();

  const int g = lane >> 2, c4 = lane & 3;   // mma fragment coordinates: row group, column pair
  const int wr = warp * 16;                 // this warp's first row in the tile
  const bool active = q0 + wr < nq;         // warps past the valid rows only help loading

  float o[kD / 8][4];
#pragma unroll
  for (int n = 0; n < kD / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m2[2] = {-INFINITY, -INFINITY};  // running max of rows g, g + 8 (log2 units)
  float l[2] = {0.f, 0.f};               // running sum (this thread's columns; quad-reduced at the end)

  for (int tile = 0; tile < ntiles; ++tile) {
    const int stage = tile & 1;
    if (tile + 1 < ntiles) load_tile(tile + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    if (active) {
      const uint4* ks = Ks + stage * kBN * kChunks;
      const uint4* vs = Vs + stage * kBN * kChunks;
      const unsigned char* fl = flags + stage * kBN;

      // S = Q K^T: 16 rows x 32 keys per warp.
      float s[4][4];
#pragma unroll
      for (int n = 0; n < 4; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
      // A fragment of Q and B fragments of K (two x4 loads = 4 n-tiles of 8 keys) for k-step kk.
      auto load_qk = [&](int kk, unsigned (&a)[4], unsigned (&b)[2][4]) {
        ldmatrix_x4(a, Qs + swz(wr + (lane & 15), kk * 2 + (lane >> 4)));
#pragma unroll
        for (int np = 0; np < 2; ++np)
          ldmatrix_x4(b[np], ks + swz(np * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1)));
      };
      auto mma_qk = [&](const unsigned (&a)[4], const unsigned (&b)[2][4]) {
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          Mma<T>::run(s[2 * np], a, b[np][0], b[np][1]);
          Mma<T>::run(s[2 * np + 1], a, b[np][2], b[np][3]);
        }
      };
      // (ptxas schedules the fragment loads of later k-steps ahead of the mma: no manual pipeline)
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        unsigned a[4], b[2][4];
        load_qk(kk, a, b);
        mma_qk(a, b);
      }

      // Mask, then online softmax per row (r = 0: row g, r = 1: row g + 8).
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int n = 0; n < 4; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = n * 8 + 2 * c4 + (e & 1);
          s[n][e] = fl[key] ? s[n][e] * kLog2e : -INFINITY;
          mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
        }
      }
      float alpha[2], mu[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        const float mn = fmaxf(m2[r], mx[r]);
        mu[r] = mn == -INFINITY ? 0.f : mn;  // all keys so far masked: keep exp2 finite
        alpha[r] = exp2f(m2[r] - mu[r]);
        m2[r] = mn;
        l[r] *= alpha[r];
      }
#pragma unroll
      for (int n = 0; n < 4; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[n][e] = exp2f(s[n][e] - mu[e >> 1]);
          l[e >> 1] += s[n][e];
        }
      }
#pragma unroll
      for (int n = 0; n < kD / 8; ++n) {
        o[n][0] *= alpha[0]; o[n][1] *= alpha[0];
        o[n][2] *= alpha[1]; o[n][3] *= alpha[1];
      }

      // O += P V: P (16 x 32) from the S registers as two k16 A fragments; V (k = key, n = dim)
      // through ldmatrix.trans, one x4 load per 16 dims.
      unsigned pa[2][4];
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        pa[kk][0] = Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]);
        pa[kk][1] = Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]);
        pa[kk][2] = Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pa[kk][3] = Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      }
      // step j: keys 16 (j / 16) .. +15, dims 16 (j % 16) .. +15
      auto load_v = [&](int j, unsigned (&b)[4]) {
        const int kk = j / (kD / 16), dn = j % (kD / 16);
        ldmatrix_x4_trans(b, vs + swz(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), dn * 2 + (lane >> 4)));
      };
      constexpr int kSteps = 2 * (kD / 16);
#pragma unroll
      for (int j = 0; j < kSteps; ++j) {
        unsigned b[4];
        load_v(j, b);
        const int kk = j / (kD / 16), dn = j % (kD / 16);
        Mma<T>::run(o[2 * dn], pa[kk], b[0], b[1]);
        Mma<T>::run(o[2 * dn + 1], pa[kk], b[2], b[3]);
      }
    }
    __syncthreads();  // the stage read here is refilled by the next iteration's prefetch
  }
  cp_async_wait<0>();

  if (!active) return;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  const int row0 = q0 + wr + g, row1 = row0 + 8;
  if (splits == 1) {
    // Whole key range in this CTA: normalize and store (rows with no valid key give 0), as T or,
    // for an FP8 projection, as its E4M3 input (common.cuh's FP8 rounding, two values at a time).
    const float inv0 = l[0] > 0.f ? 1.f / l[0] : 0.f, inv1 = l[1] > 0.f ? 1.f / l[1] : 0.f;
    const float s8 = inv_scale != nullptr ? *inv_scale : 0.f;
    auto store2 = [&](int row, int col, float a, float b) {
      if (inv_scale != nullptr) {
        *reinterpret_cast<__nv_fp8x2_storage_t*>(reinterpret_cast<uint8_t*>(out) + (int64_t)row * out_stride + col) =
            to_fp8x2<T>(a, b, s8);
      } else {
        T* p = out + (int64_t)row * out_stride + col;
        p[0] = from_f<T>(a);
        p[1] = from_f<T>(b);
      }
    };
#pragma unroll
    for (int n = 0; n < kD / 8; ++n) {
      const int col = n * 8 + 2 * c4;
      if (row0 < nq) store2(row0, col, o[n][0] * inv0, o[n][1] * inv0);
      if (row1 < nq) store2(row1, col, o[n][2] * inv1, o[n][3] * inv1);
    }
    return;
  }
  // Partial result: unnormalized O, max (log2 units) and sum, merged by attention_combine_kernel.
#pragma unroll
  for (int n = 0; n < kD / 8; ++n) {
    const int col = n * 8 + 2 * c4;
    if (row0 < rows)
      *reinterpret_cast<float2*>(part_o + ((int64_t)split * rows + row0) * kD + col) = make_float2(o[n][0], o[n][1]);
    if (row1 < rows)
      *reinterpret_cast<float2*>(part_o + ((int64_t)split * rows + row1) * kD + col) = make_float2(o[n][2], o[n][3]);
  }
  if (c4 == 0) {
    if (row0 < rows)
      *reinterpret_cast<float2*>(part_ml + ((int64_t)split * rows + row0) * 2) = make_float2(m2[0], l[0]);
    if (row1 < rows)
      *reinterpret_cast<float2*>(part_ml + ((int64_t)split * rows + row1) * 2) = make_float2(m2[1], l[1]);
  }
}

// Merge of the splits (at most 32), one warp per query row, 8 columns per lane:
//   M = max_s m_s,  out = sum_s 2^(m_s - M) O_s / sum_s 2^(m_s - M) l_s.
// Lane s loads split s's (m, l), so the statistics cost one load round trip; the weights reach the
// other lanes by shuffles and the O loads carry no data-dependent branch, so they are all in
// flight together. Every split wrote its O (zeros when its keys were all masked: m = -inf, weight 0).
template <typename T>
__global__ void attention_combine_kernel(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                         T* __restrict__ out, int64_t out_stride, int rows, int splits,
                                         const int32_t* __restrict__ cu_q, const float* __restrict__ inv_scale) {
  pdl_prologue();
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= valid_rows(cu_q, rows)) return;
  float m = -INFINITY, l = 0.f;
  if (lane < splits) {
    const float2 ml = *reinterpret_cast<const float2*>(part_ml + ((int64_t)lane * rows + row) * 2);
    m = ml.x;
    l = ml.y;
  }
  float mmax = m;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mmax = fmaxf(mmax, __shfl_xor_sync(0xffffffffu, mmax, o));
  const float w = m != -INFINITY ? exp2f(m - mmax) : 0.f;  // all splits empty: every weight 0
  const float lsum = warp_sum(w * l);
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
  for (int s = 0; s < splits; ++s) {
    const float ws = __shfl_sync(0xffffffffu, w, s);
    const float4* p = reinterpret_cast<const float4*>(part_o + ((int64_t)s * rows + row) * kD + lane * 8);
    const float4 a = p[0], b = p[1];
    acc[0] = fmaf(ws, a.x, acc[0]); acc[1] = fmaf(ws, a.y, acc[1]);
    acc[2] = fmaf(ws, a.z, acc[2]); acc[3] = fmaf(ws, a.w, acc[3]);
    acc[4] = fmaf(ws, b.x, acc[4]); acc[5] = fmaf(ws, b.y, acc[5]);
    acc[6] = fmaf(ws, b.z, acc[6]); acc[7] = fmaf(ws, b.w, acc[7]);
  }
  const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
  float r[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) r[i] = acc[i] * inv;
  if (inv_scale != nullptr)
    store_fp8<T>(reinterpret_cast<uint8_t*>(out) + (int64_t)row * out_stride + lane * 8, r, *inv_scale);
  else
    store_vec(out + (int64_t)row * out_stride + lane * 8, r);
}

template <typename T, int W>
void launch_attention(const void* q, int64_t q_stride, const void* k, int64_t k_stride, const void* v,
                      int64_t v_stride, void* out, int64_t out_stride, int rows, int n_keys, const int32_t* cu_q,
                      const int32_t* cu_k, const bool* key_mask, int splits, float* part_o, float* part_ml,
                      const float* inv_scale, int fresh_tail, cudaStream_t stream) {
  constexpr int kBM = 16 * W, kSmemBytes = smem_bytes<W>();
  auto kernel = attention_partial_kernel<T, W>;
  require(kSmemBytes <= smem_optin<attention_partial_kernel<T, W>>("attention_decode"), "attention_decode",
          "this GPU's shared memory per block is too small for the kernel");
  dim3 grid((rows + kBM - 1) / kBM, splits);
  launch("attention_decode (partial)", kernel, grid, 32 * W, kSmemBytes, stream,
      static_cast<const T*>(q), q_stride, static_cast<const T*>(k), k_stride, static_cast<const T*>(v), v_stride,
      static_cast<T*>(out), out_stride, rows, n_keys, cu_q, cu_k, key_mask, part_o, part_ml, inv_scale, fresh_tail);
  if (splits > 1) {
    constexpr int rows_per_block = 4;
    launch("attention_decode (combine)", attention_combine_kernel<T>, (rows + rows_per_block - 1) / rows_per_block,
           rows_per_block * 32, 0, stream, part_o, part_ml, static_cast<T*>(out), out_stride, rows, splits, cu_q,
           inv_scale);
  }
}

}  // namespace

void attention_decode(int dtype, const void* q, int64_t q_stride, const void* k, int64_t k_stride,
                      const void* v, int64_t v_stride, void* out, int64_t out_stride, int rows,
                      int n_keys, const int32_t* cu_q, const int32_t* cu_k, const bool* key_mask,
                      int warps, int splits, float* part_o, float* part_ml, const float* inv_scale, int fresh_tail,
                      void* stream) {
  require(splits >= 1 && splits <= 32, "attention_decode", "splits must be in [1, 32]");
  require(warps == 2 || warps == 4, "attention_decode", "warps must be 2 or 4");
  require(splits == 1 || (part_o != nullptr && part_ml != nullptr), "attention_decode", "splits > 1 needs the workspace");
  require(q_stride % 8 == 0 && k_stride % 8 == 0 && v_stride % 8 == 0 && out_stride % (inv_scale ? 16 : 8) == 0,
          "attention_decode", "row strides must be multiples of 16 bytes");
  if (rows == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    if (warps == 2)
      launch_attention<T, 2>(q, q_stride, k, k_stride, v, v_stride, out, out_stride, rows, n_keys, cu_q, cu_k, key_mask, splits, part_o, part_ml, inv_scale, fresh_tail, s);
    else
      launch_attention<T, 4>(q, q_stride, k, k_stride, v, v_stride, out, out_stride, rows, n_keys, cu_q, cu_k, key_mask, splits, part_o, part_ml, inv_scale, fresh_tail, s);
  };
  switch (dtype) {
    case kFloat16: run(__half{}); break;
    case kBFloat16: run(__nv_bfloat16{}); break;
    default: require(false, "attention_decode", "dtype must be fp16 or bf16");
  }
}

}  // namespace flashrt
