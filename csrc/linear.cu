// Skinny GEMM: y[M, N] = x[M, K] @ w[N, K]^T for few rows (M <= 64): the action expert's 50 tokens
// of a denoising step, or Pi0's single state token.
//
// At M = 50 a projection is a read of its weights (2 N K bytes) with little arithmetic: the expert's
// four projections are ~35 MB per layer, ~12 us at the copy bandwidth of an H100, and cuBLAS reaches
// about half of that on these shapes. What this kernel does about it:
//
//  - The weights are the mma's A operand (16 output features x 16 k) and x the B operand (8 tokens),
//    both loaded straight from global memory into fragments, no shared memory: per 32-k chunk each
//    lane loads 16 contiguous bytes of one weight row (and of the row 8 below) and of one token row.
//    A dot product does not care in which order k is summed, so the fragments take k in the order
//    the loads bring it; A and B use the same permutation (see `run_chunk`). The weights stream
//    through L1::no_allocate loads; x (~100-400 KB) stays in L1/L2 for every CTA that reads it.
//  - A CTA covers 64 output features (4 warps' tiles of 16) x 2 warp groups along k: 8 warps, and
//    two CTAs per SM. The groups' partial sums meet in shared memory.
//  - Split-K over the CTAs of a thread-block cluster (sm_90+; `splits` CTAs along k), reduced
//    through distributed shared memory: each CTA sums its share of the tile over the cluster. No
//    workspace, no second kernel, and a fixed summation order (deterministic).
//
// Below sm_90 there are no clusters: one CTA takes the whole k range (splits = 1).
#include "common.cuh"
#include "kernels.h"

#include <cooperative_groups.h>

namespace cg = cooperative_groups;

namespace flashrt {
namespace {

constexpr int kFeat = 64;     // output features per CTA
constexpr int kGroups = 2;    // warp groups along k in a CTA
constexpr int kThreads = 32 * 4 * kGroups;
constexpr int kChunk = 32;    // k per lane load (16 bytes of bf16/fp16)
constexpr int kAhead = 4;     // weight chunks each warp has in flight

__device__ __forceinline__ uint4 load_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// One 32-k chunk: lo/hi hold physical k 8c..8c+7 of weight rows g and g+8; b of token row g.
// mma 1 takes the pairs (8c, 8c+1) and (8c+2, 8c+3) as its logical pairs c and c+4, mma 2 the
// pairs (8c+4, 8c+5) and (8c+6, 8c+7): each k of the chunk once, the same on both operands.
template <typename T>
__device__ __forceinline__ void run_chunk(float (&acc)[4], const uint4& lo, const uint4& hi, const uint4& b) {
  const unsigned a1[4] = {lo.x, hi.x, lo.y, hi.y};
  const unsigned a2[4] = {lo.z, hi.z, lo.w, hi.w};
  Mma<T>::run(acc, a1, b.x, b.y);
  Mma<T>::run(acc, a2, b.z, b.w);
}

// MT: token tiles of 8 (M <= 8 * MT). k_cta: the k range of one CTA (k_cta / kGroups per warp, a
// multiple of kChunk).
template <typename T, int MT, bool kCluster>
__global__ void __launch_bounds__(kThreads, 2)
skinny_linear_kernel(const T* __restrict__ x, int64_t x_stride, const T* __restrict__ w, int64_t w_stride,
                     T* __restrict__ y, int64_t y_stride, int rows, int k_cta) {
  constexpr int kTokens = 8 * MT, kPitch = kFeat + 1;
  __shared__ float part[kTokens * kPitch];  // this CTA's partial tile [token][feature]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tile = warp & 3, group = warp >> 2;
  const int g = lane >> 2, c = lane & 3;
  const int k_warp = k_cta / kGroups;
  const int64_t k0 = (int64_t)blockIdx.y * k_cta + group * k_warp + 8 * c;

  for (int i = tid; i < kTokens * kPitch; i += kThreads) part[i] = 0.f;

  const T* w_lo = w + (int64_t)(blockIdx.x * kFeat + tile * 16 + g) * w_stride + k0;
  const T* w_hi = w_lo + 8 * w_stride;
  const T* xr[MT];
#pragma unroll
  for (int t = 0; t < MT; ++t) xr[t] = 8 * t + g < rows ? x + (int64_t)(8 * t + g) * x_stride + k0 : nullptr;

  float acc[MT][4] = {};
  for (int k = 0; k < k_warp; k += kChunk * kAhead) {
    uint4 lo[kAhead], hi[kAhead];
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      if (k + u * kChunk < k_warp) {
        lo[u] = load_stream(w_lo + k + u * kChunk);
        hi[u] = load_stream(w_hi + k + u * kChunk);
      }
    }
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      if (k + u * kChunk < k_warp) {
#pragma unroll
        for (int t = 0; t < MT; ++t) {
          const uint4 b = xr[t] ? __ldg(reinterpret_cast<const uint4*>(xr[t] + k + u * kChunk)) : make_uint4(0, 0, 0, 0);
          run_chunk<T>(acc[t], lo[u], hi[u], b);
        }
      }
    }
  }

  // The warp groups' partial sums meet in shared memory: acc[t] = features (g, g+8) x tokens (2c, 2c+1).
  __syncthreads();  // the zeroed tile
#pragma unroll
  for (int t = 0; t < MT; ++t) {
    const int tok = 8 * t + 2 * c, f = tile * 16 + g;
    atomicAdd(&part[tok * kPitch + f], acc[t][0]);
    atomicAdd(&part[(tok + 1) * kPitch + f], acc[t][1]);
    atomicAdd(&part[tok * kPitch + f + 8], acc[t][2]);
    atomicAdd(&part[(tok + 1) * kPitch + f + 8], acc[t][3]);
  }

  T* out = y + blockIdx.x * kFeat;
  if constexpr (!kCluster) {
    __syncthreads();
    for (int i = tid; i < rows * kFeat; i += kThreads)
      out[(int64_t)(i / kFeat) * y_stride + i % kFeat] = from_f<T>(part[(i / kFeat) * kPitch + i % kFeat]);
  } else {
#if __CUDA_ARCH__ >= 900
    // Every CTA of the cluster took one k range of the same 64 features: each sums its share of
    // the tile's tokens over the cluster's shared memories, in rank order.
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    const int splits = (int)cluster.num_blocks(), rank = (int)cluster.block_rank();
    const int per = (rows + splits - 1) / splits, t0 = rank * per, t1 = min(rows, t0 + per);
    for (int i = tid; i < (t1 - t0) * kFeat; i += kThreads) {
      const int tok = t0 + i / kFeat, f = i % kFeat;
      float s = 0.f;
      for (int q = 0; q < splits; ++q) s += cluster.map_shared_rank(part, q)[tok * kPitch + f];
      out[(int64_t)tok * y_stride + f] = from_f<T>(s);
    }
    cluster.sync();  // no CTA leaves while another still reads its shared memory
#endif
  }
}

struct DeviceInfo {
  int sms = 0, major = 0;
};

DeviceInfo device_info() {
  static DeviceInfo info[64];
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev >= 64) dev = 63;
  if (info[dev].sms == 0) {
    cudaDeviceGetAttribute(&info[dev].sms, cudaDevAttrMultiProcessorCount, dev);
    cudaDeviceGetAttribute(&info[dev].major, cudaDevAttrComputeCapabilityMajor, dev);
  }
  return info[dev];
}

template <typename T, int MT>
void launch_skinny(const void* x, int64_t x_stride, const void* w, int64_t w_stride, void* y, int64_t y_stride,
                   int rows, int n, int k, int splits, cudaStream_t stream) {
  const dim3 grid(n / kFeat, splits);
  const int k_cta = k / splits;
  if (splits == 1) {
    skinny_linear_kernel<T, MT, false><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(x), x_stride, static_cast<const T*>(w), w_stride, static_cast<T*>(y), y_stride,
        rows, k_cta);
  } else {
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = dim3(kThreads);
    config.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 1;
    attr[0].val.clusterDim.y = splits;
    attr[0].val.clusterDim.z = 1;
    config.attrs = attr;
    config.numAttrs = 1;
    cudaLaunchKernelEx(&config, skinny_linear_kernel<T, MT, true>, static_cast<const T*>(x), x_stride,
                       static_cast<const T*>(w), w_stride, static_cast<T*>(y), y_stride, rows, k_cta);
  }
  check_launch("skinny_linear");
}

}  // namespace

int skinny_linear_splits(int n, int k) {
  const DeviceInfo info = device_info();
  int splits = 1;
  if (info.major >= 9) {  // clusters: enough CTAs for every SM, each CTA's k range a whole number of chunks
    const int blocks = n / kFeat;
    while (splits < 8 && blocks * splits < info.sms && k % (2 * splits * kGroups * kChunk) == 0) splits *= 2;
  }
  return splits;
}

void skinny_linear(int dtype, const void* x, int64_t x_stride, const void* w, int64_t w_stride, void* y,
                   int64_t y_stride, int rows, int n, int k, int splits, void* stream) {
  require(rows >= 1 && rows <= kMaxSkinnyRows, "skinny_linear", "rows must be in [1, 64]");
  require(n % kFeat == 0, "skinny_linear", "n must be a multiple of 64");
  require(splits >= 1 && splits <= 8 && (splits & (splits - 1)) == 0, "skinny_linear", "splits must be 1, 2, 4 or 8");
  require(k % (splits * kGroups * kChunk) == 0, "skinny_linear", "k must be a multiple of 64 * splits");
  require(splits == 1 || device_info().major >= 9, "skinny_linear", "splits > 1 needs clusters (sm_90+)");
  require(x_stride % 8 == 0 && w_stride % 8 == 0, "skinny_linear", "x and w row strides must be multiples of 16 bytes");
  auto s = static_cast<cudaStream_t>(stream);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    if (rows <= 8)
      launch_skinny<T, 1>(x, x_stride, w, w_stride, y, y_stride, rows, n, k, splits, s);
    else
      launch_skinny<T, 8>(x, x_stride, w, w_stride, y, y_stride, rows, n, k, splits, s);
  };
  switch (dtype) {
    case kFloat16: run(__half{}); break;
    case kBFloat16: run(__nv_bfloat16{}); break;
    default: require(false, "skinny_linear", "dtype must be fp16 or bf16");
  }
}

}  // namespace flashrt
