// Fused residual + normalization kernels: RMSNorm (Gemma), adaRMSNorm (Pi0.5 action expert) and
// LayerNorm (SigLIP), each optionally preceded by the residual add x += y or the gated residual
// x += gate * y, all in one pass over the row.
//
// One thread block per row. The row is read once into registers as 16-byte vectors (VPT vectors
// per thread), the residual is added and rounded to the dtype exactly as PyTorch's in-place add
// would leave it, written back to x, and the statistics are reduced over the block in fp32 (warp
// shuffles, then one value per warp through shared memory). The normalized row, with the optional
// per-column scale/shift, is written with one rounding; or, with `inv_scale` set, as FP8 E4M3
// scaled by *inv_scale (the static input scale of the FP8 projection that reads it), so the
// quantization costs no launch of its own.
//
// Bytes per row: read x (+ y, + gate/scale/shift rows, which stay in L1/L2 across rows), write x
// (residual modes) and out. For a Gemma-2B prefix row of 2048 bf16 that is 4 KB in, 8 KB out.

#include "common.cuh"
#include "kernels.h"

#include <type_traits>

namespace flashrt {
namespace {

template <typename T, int VPT, int RES, bool LN, bool AFFINE>
__global__ void norm_kernel(T* __restrict__ x, int64_t x_stride, const T* __restrict__ y, int64_t y_stride,
                            const float* __restrict__ y_part, int y_splits, int64_t y_split_stride,
                            const T* __restrict__ gate, const T* __restrict__ scale,
                            const T* __restrict__ shift, T* __restrict__ out, int64_t out_stride,
                            int width, float eps, const float* __restrict__ inv_scale) {
  pdl_launch_dependents();
  constexpr int N = Vec<T>::N;
  __shared__ float scratch[33];
  const int64_t row = blockIdx.x;
  const int nvec = width / N;
  // 0. the parameters (gate, scale, shift, inv_scale: never written by the kernel just before, see
  //    kernels.h) load into registers while that kernel drains; x and y only after the wait. Only
  //    for one vector per thread (the expert's 1024-wide rows): wider rows would hold 3 VPT more
  //    vectors (164 registers at VPT 4) and lose occupancy, so they load them where they are used.
  constexpr bool kEarly = VPT == 1;
  float gv[VPT][N], sc[VPT][N], sh[VPT][N];
  auto load_gate = [&](int j) {  // vector j of this thread
    if constexpr (RES == kResGated) {
      const int c = threadIdx.x + j * blockDim.x;
      load_vec_ro(gate + c * N, gv[j]);
    }
  };
  auto load_affine = [&](int j) {
    if constexpr (AFFINE) {
      const int c = threadIdx.x + j * blockDim.x;
      load_vec_ro(scale + c * N, sc[j]);
      load_vec_ro(shift + c * N, sh[j]);
    }
  };
  if (kEarly && threadIdx.x < nvec) {
    load_gate(0);
    load_affine(0);
  }
  const float inv = inv_scale != nullptr ? *inv_scale : 0.f;
  pdl_wait();
  T* xr = x + row * x_stride;
  const T* yr = RES != kResNone && y != nullptr ? y + row * y_stride : nullptr;
  const float* pr = y_part != nullptr ? y_part + row * y_stride : nullptr;  // y as fp32 split-K partials

  // 1. load (and residual-add) the row into registers; padding lanes hold zeros.
  float v[VPT][N];
  float s1 = 0.f;
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int c = threadIdx.x + j * blockDim.x;
    if (c < nvec) {
      load_vec(xr + c * N, v[j]);
      if constexpr (RES != kResNone) {
        float a[N];
        if (pr != nullptr) {
          // The GEMM before left its split-K partials (skinny_gemm_partials): their sum, rounded
          // to T as the GEMM's own output would have been.
#pragma unroll
          for (int i = 0; i < N; ++i) a[i] = 0.f;
          for (int sp = 0; sp < y_splits; ++sp) {
#pragma unroll
            for (int q = 0; q < N / 4; ++q) {
              const float4 u = __ldg(reinterpret_cast<const float4*>(pr + sp * y_split_stride + c * N) + q);
              a[4 * q] += u.x; a[4 * q + 1] += u.y; a[4 * q + 2] += u.z; a[4 * q + 3] += u.w;
            }
          }
#pragma unroll
          for (int i = 0; i < N; ++i) a[i] = round_to<T>(a[i]);
        } else {
          load_vec_ro(yr + c * N, a);
        }
        if constexpr (RES == kResGated) {
          if constexpr (!kEarly) load_gate(j);
#pragma unroll
          for (int i = 0; i < N; ++i) v[j][i] = round_to<T>(fmaf(a[i], gv[j][i], v[j][i]));
        } else {
#pragma unroll
          for (int i = 0; i < N; ++i) v[j][i] = round_to<T>(v[j][i] + a[i]);
        }
        store_vec(xr + c * N, v[j]);
      }
#pragma unroll
      for (int i = 0; i < N; ++i) s1 += LN ? v[j][i] : v[j][i] * v[j][i];
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) v[j][i] = 0.f;
    }
  }

  // 2. statistics in fp32. LayerNorm takes a second pass over the registers for the centred
  //    variance (no cancellation, unlike E[x^2] - E[x]^2).
  float mean = 0.f, rstd;
  if constexpr (LN) {
    mean = block_sum(s1, scratch) / width;
    float s2 = 0.f;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      if (threadIdx.x + j * blockDim.x < nvec) {
#pragma unroll
        for (int i = 0; i < N; ++i) {
          const float d = v[j][i] - mean;
          s2 += d * d;
        }
      }
    }
    rstd = rsqrtf(block_sum(s2, scratch) / width + eps);
  } else {
    rstd = rsqrtf(block_sum(s1, scratch) / width + eps);
  }

  // 3. normalize, optional per-column affine, one rounding on store (to T, or T then FP8).
  T* outr = out + row * out_stride;
  uint8_t* out8 = reinterpret_cast<uint8_t*>(out) + row * out_stride;  // FP8 rows: one byte per element
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int c = threadIdx.x + j * blockDim.x;
    if (c < nvec) {
      float o[N];
#pragma unroll
      for (int i = 0; i < N; ++i) o[i] = (v[j][i] - mean) * rstd;
      if constexpr (AFFINE) {
        if constexpr (!kEarly) load_affine(j);
#pragma unroll
        for (int i = 0; i < N; ++i) o[i] = fmaf(o[i], sc[j][i], sh[j][i]);
      }
      if (inv_scale != nullptr) store_fp8<T>(out8 + c * N, o, inv);
      else store_vec(outr + c * N, o);
    }
  }
}

template <typename T, int RES, bool LN, bool AFFINE>
void launch_norm(T* x, int64_t x_stride, const T* y, int64_t y_stride, const float* y_part, int y_splits,
                 int64_t y_split_stride, const T* gate, const T* scale,
                 const T* shift, T* out, int64_t out_stride, int rows, int width, float eps,
                 const float* inv_scale, cudaStream_t stream) {
  constexpr int N = Vec<T>::N;
  const int nvec = width / N;
  // One vector per thread up to 1024 vectors (8192 bf16), four beyond that (32768 bf16).
  if (nvec <= 1024) {
    const int threads = ((nvec + 31) / 32) * 32;
    launch("norm", norm_kernel<T, 1, RES, LN, AFFINE>, rows, threads, 0, stream,
        x, x_stride, y, y_stride, y_part, y_splits, y_split_stride, gate, scale, shift, out, out_stride, width, eps,
        inv_scale);
  } else {
    const int threads = (((nvec + 3) / 4 + 31) / 32) * 32;
    launch("norm", norm_kernel<T, 4, RES, LN, AFFINE>, rows, threads, 0, stream,
        x, x_stride, y, y_stride, y_part, y_splits, y_split_stride, gate, scale, shift, out, out_stride, width, eps,
        inv_scale);
  }
}

template <typename T>
void norm_t(void* x, int64_t x_stride, const void* y, int64_t y_stride, int y_splits, int64_t y_split_stride,
            const void* gate, const void* scale, const void* shift, void* out, int64_t out_stride, int rows,
            int width, float eps, int residual, bool layer_norm, const float* inv_scale, cudaStream_t stream) {
  auto X = static_cast<T*>(x);
  auto Y = y_splits > 0 ? nullptr : static_cast<const T*>(y);
  auto YP = y_splits > 0 ? static_cast<const float*>(y) : nullptr;
  auto G = static_cast<const T*>(gate);
  auto S = static_cast<const T*>(scale);
  auto B = static_cast<const T*>(shift);
  auto O = static_cast<T*>(out);
  const bool affine = scale != nullptr;
  // One launch per template combination; the arguments are the same for all of them.
  auto go = [&](auto res, auto ln, auto aff) {
    launch_norm<T, decltype(res)::value, decltype(ln)::value, decltype(aff)::value>(
        X, x_stride, Y, y_stride, YP, y_splits, y_split_stride, G, S, B, O, out_stride, rows, width, eps, inv_scale,
        stream);
  };
  using None = std::integral_constant<int, kResNone>;
  using Add = std::integral_constant<int, kResAdd>;
  using Gated = std::integral_constant<int, kResGated>;
  using Yes = std::true_type;
  using No = std::false_type;
  // The six combinations the models use (flashrt/ops/torch_ops.py):
  if (layer_norm) {
    require(affine, "norm", "layer_norm needs weight and bias");
    require(residual != kResGated, "norm", "gated residual is not used with layer_norm");
    if (residual == kResNone) go(None{}, Yes{}, Yes{});
    else go(Add{}, Yes{}, Yes{});
  } else if (affine) {  // adaRMSNorm
    require(residual != kResAdd, "norm", "adaRMSNorm takes the gated residual");
    if (residual == kResNone) go(None{}, No{}, Yes{});
    else go(Gated{}, No{}, Yes{});
  } else {  // plain RMSNorm, (1 + w) folded into the next projection
    require(residual != kResGated, "norm", "RMSNorm takes the plain residual");
    if (residual == kResNone) go(None{}, No{}, No{});
    else go(Add{}, No{}, No{});
  }
}

}  // namespace

void norm(int dtype, void* x, int64_t x_stride, const void* y, int64_t y_stride, int y_splits, int64_t y_split_stride,
          const void* gate, const void* scale, const void* shift, void* out, int64_t out_stride, int rows, int width,
          float eps, int residual, bool layer_norm, const float* inv_scale, void* stream) {
  require(y_splits == 0 || (residual != kResNone && y_stride % 4 == 0 && y_split_stride % 4 == 0), "norm",
          "split-K partials (y_splits > 0) need a residual mode and 16-byte aligned rows");
  const int vec = dtype == kFloat32 ? 4 : 8;
  require(width > 0 && width % vec == 0 && width / vec <= 4096, "norm", "width must be a positive multiple of 16 bytes, at most 4096 vectors");
  require(residual == kResNone || residual == kResAdd || residual == kResGated, "norm", "unknown residual mode");
  require(residual != kResGated || gate != nullptr, "norm", "gated residual needs gate");
  require((scale == nullptr) == (shift == nullptr), "norm", "scale and shift go together");
  require(inv_scale == nullptr || dtype != kFloat32, "norm", "FP8 output is for bf16/fp16 models");
  if (rows == 0) return;
  auto run = [&](auto tag) {
    norm_t<decltype(tag)>(x, x_stride, y, y_stride, y_splits, y_split_stride, gate, scale, shift, out, out_stride,
                          rows, width, eps, residual, layer_norm, inv_scale, static_cast<cudaStream_t>(stream));
  };
  switch (dtype) {
    case kFloat32: run(float{}); break;
    case kFloat16: run(__half{}); break;
    case kBFloat16: run(__nv_bfloat16{}); break;
    default: require(false, "norm", "unsupported dtype");
  }
}

}  // namespace flashrt
