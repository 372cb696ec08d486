// Split-K GEMM for few rows against a weight pre-tiled at load: the action expert's 50-row
// projections, where cuBLAS spends 30 us a layer (csrc/README.md, "Skinny GEMM, session 8").
//
//   part[s, r, n] = sum over k in split s of x[r, k] * w[n, k]      (fp32; the consumer sums s)
//
// Shapes: rows <= 56 (7 n8 tiles of mma.sync), n a multiple of 16 WF, k / splits a multiple of 64.
// The weight is re-laid out once (flashrt.quant.tile_skinny_weight) so that one CTA's slice,
// WF * 16 output features by k / splits inputs, is one contiguous block in mma.sync A-fragment
// order: each lane's fragment of a 16 x 16 block is one 16-byte shared load.
//
// CTA = WF feature warps (16 features each) x KSPLIT warp groups taking the 64-wide k chunks in
// turn; grid = (n / (16 WF), splits). Per CTA:
//   1. the weights are requested with cp.async before griddepcontrol.wait: they are constant, so
//      they stream while the kernel ahead finishes. (Bulk copies issued there are held until the
//      grid ahead completes; cp.async is not. Measured on the H100.)
//   2. after the wait, x's slice arrives chunk by chunk, each chunk counted on its own mbarrier, so
//      a chunk's MMAs start while the later chunks are in flight;
//   3. the accumulators are staged through shared memory (over the weights) and written as rows
//      of fp32 partials.

#include "common.cuh"
#include "kernels.h"
#include "mma.cuh"

namespace flashrt {
namespace {

constexpr int kChunk = 64;       // k per chunk
constexpr int kMaxChunks = 16;   // k / splits <= 1024
constexpr int kRows = 56;        // 7 n8 tiles

__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
}
// Completion of this thread's earlier cp.asyncs counts as one arrival on `bar`.
__device__ __forceinline__ void mbar_arrive_on_copies(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared.b64 [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned phase) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.test_wait.parity.shared.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(phase)
      : "memory");
}

// Shared memory: [weights (KS x 32 WF bytes), reused for staging] [x rows] [one mbarrier per chunk].
__host__ __device__ inline size_t weights_bytes(int wf, int ksplit, int ks) {
  const size_t w = (size_t)ks * wf * 32, staging = (size_t)ksplit * kRows * (wf * 16 + 4) * 4;
  return w > staging ? w : staging;
}
__host__ __device__ inline int x_row_bytes(int ks) { return ks * 2 + 16; }  // +16: ldmatrix rows hit distinct banks
inline size_t smem_bytes(int wf, int ksplit, int ks, int rows) {
  return weights_bytes(wf, ksplit, ks) + (size_t)rows * x_row_bytes(ks) + kMaxChunks * 8;
}

template <int WF, int KSPLIT>
__global__ void __launch_bounds__(32 * WF * KSPLIT)
skinny_gemm_kernel(const __nv_bfloat16* __restrict__ x, int64_t x_stride, const unsigned char* __restrict__ wt,
                   int K, int N, int M, int KS, float* __restrict__ part) {
  constexpr int BN = WF * 16, NTH = 32 * WF * KSPLIT, LD = BN + 4;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, fw = warp % WF, kh = warp / WF;
  const int tile = blockIdx.x, split = blockIdx.y;
  const int nchunks = KS / kChunk;
  const int xrow = x_row_bytes(KS);
  unsigned char* ws = smem;
  unsigned char* xs = smem + weights_bytes(WF, KSPLIT, KS);
  uint64_t* xbar = reinterpret_cast<uint64_t*>(xs + (size_t)M * xrow);

  if (tid == 0)
    for (int c = 0; c < nchunks; ++c) mbar_init(&xbar[c], NTH);
  __syncthreads();
  pdl_launch_dependents();

  // 1. this CTA's weights: one contiguous block
  const unsigned char* wsrc = wt + ((int64_t)tile * (K / 16) + (int64_t)split * (KS / 16)) * (WF * 512);
  for (int i = tid; i < KS * BN * 2 / 16; i += NTH) cp_async16(ws + i * 16, wsrc + i * 16);
  cp_async_commit();

  pdl_wait();
  // 2. x chunk by chunk (left uncommitted: the wait_group below covers the weights only)
  const __nv_bfloat16* xsrc = x + (int64_t)split * KS;
  constexpr int kPieces = kChunk / 8;  // 16-byte pieces per row per chunk
  for (int c = 0; c < nchunks; ++c) {
    for (int i = tid; i < M * kPieces; i += NTH) {
      const int r = i / kPieces, p = c * kPieces + i % kPieces;
      cp_async16(xs + r * xrow + p * 16, xsrc + r * x_stride + p * 8);
    }
    mbar_arrive_on_copies(&xbar[c]);
  }
  cp_async_wait<0>();
  __syncthreads();  // every thread's weight pieces have landed

  float acc[7][4];
#pragma unroll
  for (int j = 0; j < 7; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  const int m = lane >> 3, r8 = lane & 7;  // this lane's ldmatrix row: matrix m, row r8
  for (int c = kh; c < nchunks; c += KSPLIT) {
    mbar_wait(&xbar[c], 0);
#pragma unroll
    for (int s = 0; s < kChunk / 16; ++s) {
      const int ks = c * (kChunk / 16) + s;
      unsigned a[4];  // this lane's A fragment: one 16-byte shared load
      *reinterpret_cast<uint4*>(a) = *reinterpret_cast<const uint4*>(ws + ((ks * WF + fw) * 32 + lane) * 16);
      // B = x^T: matrices (n-tile j, k 0-7), (j, k 8-15), (j + 1, k 0-7), (j + 1, k 8-15); rows past M
      // read row M - 1, whose products land only in output rows that are never stored.
#pragma unroll
      for (int jp = 0; jp < 3; ++jp) {
        const int n = min((2 * jp + (m >> 1)) * 8 + r8, M - 1);
        unsigned b[4];
        ldmatrix_x4(b, xs + n * xrow + (ks * 16 + (m & 1) * 8) * 2);
        Mma<__nv_bfloat16>::run(acc[2 * jp], a, b[0], b[1]);
        Mma<__nv_bfloat16>::run(acc[2 * jp + 1], a, b[2], b[3]);
      }
      const int n = min(48 + r8, M - 1);
      unsigned b[2];
      ldmatrix_x2(b, xs + n * xrow + (ks * 16 + (m & 1) * 8) * 2);
      Mma<__nv_bfloat16>::run(acc[6], a, b[0], b[1]);
    }
  }

  // 3. accumulators (features x rows) -> staging[kh][row][feature] over the weights -> fp32 rows
  __syncthreads();
  float* stage = reinterpret_cast<float*>(smem) + kh * kRows * LD;
  const int g = lane >> 2, c4 = lane & 3;
#pragma unroll
  for (int j = 0; j < 7; ++j) {
    const int r = j * 8 + 2 * c4, f = fw * 16 + g;
    stage[r * LD + f] = acc[j][0];
    stage[(r + 1) * LD + f] = acc[j][1];
    stage[r * LD + f + 8] = acc[j][2];
    stage[(r + 1) * LD + f + 8] = acc[j][3];
  }
  __syncthreads();
  const float* st = reinterpret_cast<const float*>(smem);
  for (int i = tid; i < M * (BN / 4); i += NTH) {
    const int r = i / (BN / 4), f = (i % (BN / 4)) * 4;
    float4 v = *reinterpret_cast<const float4*>(st + r * LD + f);
    if (KSPLIT == 2) {
      const float4 u = *reinterpret_cast<const float4*>(st + kRows * LD + r * LD + f);
      v.x += u.x; v.y += u.y; v.z += u.z; v.w += u.w;
    }
    *reinterpret_cast<float4*>(part + ((int64_t)split * M + r) * N + tile * BN + f) = v;
  }
}

template <int WF, int KSPLIT>
void launch_skinny(const void* x, int64_t x_stride, const void* wt, int rows, int k, int n, int splits, float* part,
                   cudaStream_t stream) {
  const int ks = k / splits;
  const size_t smem = smem_bytes(WF, KSPLIT, ks, rows);
  auto kernel = skinny_gemm_kernel<WF, KSPLIT>;
  require(smem <= smem_optin<skinny_gemm_kernel<WF, KSPLIT>>("skinny_gemm_partials"), "skinny_gemm_partials",
          "k / splits too large for this GPU's shared memory: use more splits or ksplit 1");
  launch("skinny_gemm_partials", kernel, dim3(n / (WF * 16), splits), 32 * WF * KSPLIT, smem, stream,
         static_cast<const __nv_bfloat16*>(x), x_stride, static_cast<const unsigned char*>(wt), k, n, rows, ks, part);
}

}  // namespace

void skinny_gemm_partials(int dtype, const void* x, int64_t x_stride, const void* wt, int rows, int k, int n,
                          int splits, int wf, int ksplit, float* part, void* stream) {
  require(dtype == kBFloat16, "skinny_gemm_partials", "only bfloat16 is supported");
  require(rows >= 1 && rows <= kRows, "skinny_gemm_partials", "rows must be in [1, 56]");
  require(wf == 4 || wf == 8, "skinny_gemm_partials", "wf must be 4 or 8");
  require(ksplit == 1 || ksplit == 2, "skinny_gemm_partials", "ksplit must be 1 or 2");
  require(n % (16 * wf) == 0, "skinny_gemm_partials", "n must be a multiple of 16 * wf");
  require(splits >= 1 && k % splits == 0 && (k / splits) % kChunk == 0 && k / splits / kChunk <= kMaxChunks &&
              k / splits / kChunk >= ksplit,
          "skinny_gemm_partials", "k / splits must be a multiple of 64, at most 1024, with a chunk per warp group");
  require(x_stride % 8 == 0, "skinny_gemm_partials", "x's row stride must be a multiple of 16 bytes");
  auto s = static_cast<cudaStream_t>(stream);
  if (wf == 4 && ksplit == 1) launch_skinny<4, 1>(x, x_stride, wt, rows, k, n, splits, part, s);
  else if (wf == 4) launch_skinny<4, 2>(x, x_stride, wt, rows, k, n, splits, part, s);
  else if (ksplit == 1) launch_skinny<8, 1>(x, x_stride, wt, rows, k, n, splits, part, s);
  else launch_skinny<8, 2>(x, x_stride, wt, rows, k, n, splits, part, s);
}

}  // namespace flashrt
