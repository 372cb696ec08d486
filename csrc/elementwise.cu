// Memory-bound fused kernels: GeGLU, rotary embedding with the KV-cache write, the flow-matching
// Euler update fused with the action output projection, image preprocessing, and the quantization
// around FP8 and INT8 GEMMs; and the L2 prefetch of weights a later GEMM reads.

#include <algorithm>

#include "common.cuh"
#include "kernels.h"

namespace flashrt {
namespace {

// ------------------------------------------------------------------------------------------------
// GeGLU: out[t, j] = gelu_tanh(gate[t, j]) * up[t, j], reading the fused gate/up GEMM output
// gu = [gate | up] ([rows, 2m]) directly; or, not GATED, SigLIP's plain out = gelu_tanh(x). One
// 16-byte vector of gate and the matching vector of up per thread; blockIdx.y is the row, so no
// division per element. gelu_tanh as PyTorch writes it:
// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in fp32 with one rounding of the product.
// Bytes: read 2m, write m elements per row (m bytes when written as FP8 for the down projection,
// see store_fp8).
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ float gelu_tanh(float x) {
  constexpr float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
  constexpr float kKappa = 0.044715f;
  const float inner = kBeta * (x + kKappa * x * x * x);
  return 0.5f * x * (1.f + tanhf(inner));
}

template <typename T, bool GATED>
__global__ void gelu_tanh_kernel(const T* __restrict__ gu, int64_t gu_stride, T* __restrict__ out, int m,
                                 const float* __restrict__ inv_scale) {
  pdl_prologue();
  constexpr int N = Vec<T>::N;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;  // vector index within the row
  if (c * N >= m) return;
  const int64_t row = blockIdx.y;
  const T* g = gu + row * gu_stride + c * N;
  float a[N], o[N];
  load_vec_ro(g, a);
#pragma unroll
  for (int i = 0; i < N; ++i) o[i] = gelu_tanh(a[i]);
  if constexpr (GATED) {
    float b[N];
    load_vec_ro(g + m, b);
#pragma unroll
    for (int i = 0; i < N; ++i) o[i] *= b[i];
  }
  if (inv_scale != nullptr) store_fp8<T>(reinterpret_cast<uint8_t*>(out) + row * (int64_t)m + c * N, o, *inv_scale);
  else store_vec(out + row * (int64_t)m + c * N, o);
}

// ------------------------------------------------------------------------------------------------
// FP8 quantization of rows no fused producer writes (the prefix's and SigLIP's torch attention
// before an FP8 o projection): out8[t, j] = e4m3(x[t, j] * *inv_scale),
// saturating. One 16-byte vector per thread.
// ------------------------------------------------------------------------------------------------
template <typename T>
__global__ void quantize_fp8_kernel(const T* __restrict__ x, int64_t x_stride, uint8_t* __restrict__ out,
                                    int width, const float* __restrict__ inv_scale) {
  pdl_prologue();
  constexpr int N = Vec<T>::N;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c * N >= width) return;
  const int64_t row = blockIdx.y;
  float v[N];
  load_vec_ro(x + row * x_stride + c * N, v);
  store_fp8<T>(out + row * (int64_t)width + c * N, v, *inv_scale);
}

// ------------------------------------------------------------------------------------------------
// INT8 W8A8 (Orin) around torch._int_mm, which needs more than 16 rows:
//   quantize: q[r] = clamp(rint(x[r] / s_r), +-127), s_r = max(amax_r, 1e-12) * (1/127) (per token,
//     exactly quant.quantize_per_token); rows in [rows, rows_out) are zeroed, so a short input
//     arrives padded without a copy. One block per row: amax pass, then quantize pass (the row,
//     at most 32 KB, is re-read from L1/L2).
//   dequantize: out[r, n] = T(acc[r, n] * s_r * w_n + bias_n), in fp32 in that order (as quant.py),
//     four int32 per thread.
// ------------------------------------------------------------------------------------------------
template <typename T>
__global__ void quantize_int8_kernel(const T* __restrict__ x, int64_t x_stride, int8_t* __restrict__ q,
                                     float* __restrict__ scale, int rows, int width) {
  pdl_prologue();
  constexpr int N = Vec<T>::N;
  __shared__ float scratch[33];
  const int64_t row = blockIdx.x;
  const int nvec = width / N;
  int8_t* qr = q + row * width;
  union Bytes { int8_t b[N]; uint2 u2; uint32_t u1; };
  auto store = [&](int c, const Bytes& v) {
    if constexpr (N == 8) *reinterpret_cast<uint2*>(qr + c * N) = v.u2;
    else *reinterpret_cast<uint32_t*>(qr + c * N) = v.u1;
  };
  if (row >= rows) {  // padding rows
    Bytes z;
    z.u2 = make_uint2(0u, 0u);
    for (int c = threadIdx.x; c < nvec; c += blockDim.x) store(c, z);
    return;
  }
  const T* xr = x + row * x_stride;
  float amax = 0.f;
  for (int c = threadIdx.x; c < nvec; c += blockDim.x) {
    float v[N];
    load_vec_ro(xr + c * N, v);
#pragma unroll
    for (int i = 0; i < N; ++i) amax = fmaxf(amax, fabsf(v[i]));
  }
  // amax * (1 / 127), not amax / 127: what torch computes for a tensor divided by a Python number
  const float s = __fmul_rn(fmaxf(block_max(amax, scratch), 1e-12f), 1.f / 127.f);
  if (threadIdx.x == 0) scale[row] = s;
  for (int c = threadIdx.x; c < nvec; c += blockDim.x) {
    float v[N];
    load_vec_ro(xr + c * N, v);
    Bytes o;
#pragma unroll
    for (int i = 0; i < N; ++i) o.b[i] = static_cast<int8_t>(fminf(fmaxf(rintf(v[i] / s), -127.f), 127.f));
    store(c, o);
  }
}

template <typename T>
__global__ void dequantize_int8_kernel(const int32_t* __restrict__ acc, int64_t acc_stride,
                                       const float* __restrict__ row_scale, const float* __restrict__ col_scale,
                                       const T* __restrict__ bias, T* __restrict__ out, int64_t out_stride, int n) {
  pdl_prologue();
  const int c = (blockIdx.x * blockDim.x + threadIdx.x) * 4;
  if (c >= n) return;
  const int64_t r = blockIdx.y;
  const int4 a = *reinterpret_cast<const int4*>(acc + r * acc_stride + c);
  const float4 w = __ldg(reinterpret_cast<const float4*>(col_scale + c));
  const float s = row_scale[r];
  // _rn intrinsics: separate roundings, never contracted into an fma (the reference rounds each step)
  const float o[4] = {__fmul_rn(__fmul_rn(static_cast<float>(a.x), s), w.x), __fmul_rn(__fmul_rn(static_cast<float>(a.y), s), w.y),
                      __fmul_rn(__fmul_rn(static_cast<float>(a.z), s), w.z), __fmul_rn(__fmul_rn(static_cast<float>(a.w), s), w.w)};
  T* orow = out + r * out_stride + c;
#pragma unroll
  for (int i = 0; i < 4; ++i) orow[i] = from_f<T>(bias != nullptr ? __fadd_rn(o[i], to_f(bias[c + i])) : o[i]);
}

// ------------------------------------------------------------------------------------------------
// Rotary embedding on the fused QKV projection, one KV head (Gemma / Pi0):
//   qkv row = [q_0 .. q_{H-1} | k | v], each head d wide.
//   rope(x)[i] = x[i] * cos[i] + x[(i + d/2) % d] * sin[i], with the engine's tables
//   cos = [cos | cos], sin = [-sin | sin] (the split-half rotation, exactly torch_ops.rope_qkv).
// One block per token. A work item is one 16-byte vector at column c of the lower half together
// with its partner at c + d/2 (each needs the other), for the H query heads and k; the remaining
// items copy v. q goes to a new [rows, H, d] tensor; k and v go straight into the cache row
// slots[t] (rows past the prefix during the denoising steps), so no separate copy kernel runs.
// Bytes per token: read (H + 2) d + 2 d (tables), write (H + 2) d.
// ------------------------------------------------------------------------------------------------
template <typename T>
__global__ void rope_qkv_kernel(const T* __restrict__ qkv, int64_t qkv_stride, const T* __restrict__ cos,
                                int64_t cos_stride, const T* __restrict__ sin, int64_t sin_stride, int heads,
                                int d, T* __restrict__ q_out, T* __restrict__ k_cache, int64_t k_stride,
                                T* __restrict__ v_cache, int64_t v_stride, const int64_t* __restrict__ slots) {
  pdl_prologue();
  constexpr int N = Vec<T>::N;
  const int64_t t = blockIdx.x;
  const int half = d / 2;
  const int pairs = half / N;                 // vector pairs per head
  const int rope_items = (heads + 1) * pairs;  // q heads and k
  const int items = rope_items + d / N;       // + v vectors
  const int64_t slot = slots != nullptr ? slots[t] : t;
  const T* src = qkv + t * qkv_stride;
  const T* cr = cos + t * cos_stride;
  const T* sr = sin + t * sin_stride;
  for (int it = threadIdx.x; it < items; it += blockDim.x) {
    if (it < rope_items) {
      const int h = it / pairs;
      const int lo = (it - h * pairs) * N, hi = lo + half;
      float xl[N], xh[N], cl[N], ch[N], sl[N], sh[N], ol[N], oh[N];
      load_vec_ro(src + h * d + lo, xl);
      load_vec_ro(src + h * d + hi, xh);
      load_vec_ro(cr + lo, cl);
      load_vec_ro(cr + hi, ch);
      load_vec_ro(sr + lo, sl);
      load_vec_ro(sr + hi, sh);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        ol[i] = fmaf(xh[i], sl[i], xl[i] * cl[i]);
        oh[i] = fmaf(xl[i], sh[i], xh[i] * ch[i]);
      }
      T* dst = h < heads ? q_out + (t * heads + h) * d : k_cache + slot * k_stride;
      store_vec(dst + lo, ol);
      store_vec(dst + hi, oh);
    } else {
      const int c = (it - rope_items) * N;
      *reinterpret_cast<uint4*>(v_cache + slot * v_stride + c) =
          __ldg(reinterpret_cast<const uint4*>(src + (heads + 1) * d + c));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Flow-matching Euler update fused with the action output projection:
//   acc[r, o] += x[r, :] . w[o, :] + b[o]     (dt is folded into w and b at load)
// acc is the fp32 flow state [H, 32]; x the expert's final-normed output [H, 1024]. The torch path
// runs a bf16 GEMM (rounding v to bf16) and then an add kernel. Here one warp computes one output
// element in fp32: the lanes stride the k axis in 16-byte vectors (all loads of a lane issued
// before the first use: 4 + 4 for k = 1024) and reduce with shuffles, so the kernel costs about
// one L2 round trip. Bytes: x and w (64 KB, from L2 after the first row), acc read and written.
// ------------------------------------------------------------------------------------------------
template <typename T>
__global__ void linear_accumulate_kernel(float* __restrict__ acc, int64_t acc_stride, const T* __restrict__ x,
                                         int64_t x_stride, const T* __restrict__ w, int64_t w_stride,
                                         const T* __restrict__ b, int rows, int n_out, int k) {
  pdl_prologue();
  constexpr int N = Vec<T>::N;
  const int lane = threadIdx.x & 31;
  const int64_t item = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (item >= (int64_t)rows * n_out) return;
  const int64_t row = item / n_out;
  const int o = (int)(item - row * n_out);
  const T* xr = x + row * x_stride;
  const T* wr = w + (int64_t)o * w_stride;
  const int kv = k / N;
  float s = 0.f;
#pragma unroll 4
  for (int c = lane; c < kv; c += 32) {
    float a[N], ww[N];
    load_vec_ro(xr + c * N, a);
    load_vec_ro(wr + c * N, ww);
#pragma unroll
    for (int i = 0; i < N; ++i) s = fmaf(a[i], ww[i], s);
  }
  s = warp_sum(s);
  if (lane == 0) {
    if (b != nullptr) s += to_f(b[o]);
    acc[row * acc_stride + o] += s;
  }
}

// ------------------------------------------------------------------------------------------------
// Image preprocessing, all cameras in one launch (blockIdx.y = camera): uint8 [h, w, 3] ->
// out[slot] = [3, S, S] in [-1, 1], resize-with-pad as flashrt/preprocess.py: bilinear resize to
// (nh, nw) with PyTorch's align_corners=False arithmetic (scale = in / out in fp32, source index
// clamped at 0, upper neighbour clamped at the edge), centred at (top, left), padding -1.
// The value is rounded like the torch op does it: (r * 2/255) rounded to the dtype, then - 1,
// rounded again, so both paths give the same numbers. One thread per output pixel, 3 channels.
// ------------------------------------------------------------------------------------------------
struct CameraBatch {
  CameraImage cam[kMaxCameras];
};

template <typename T>
__global__ void images_to_model_kernel(CameraBatch batch, T* __restrict__ out, int size) {
  pdl_prologue();
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  const int plane = size * size;
  if (p >= plane) return;
  const CameraImage c = batch.cam[blockIdx.y];
  const int oy = p / size, ox = p - oy * size;
  T* o = out + (int64_t)c.slot * 3 * plane + p;
  const int iy = oy - c.top, ix = ox - c.left;
  if (iy < 0 || iy >= c.nh || ix < 0 || ix >= c.nw) {
    o[0] = o[plane] = o[2 * plane] = from_f<T>(-1.f);
    return;
  }
  const float rh = (float)c.h / (float)c.nh, rw = (float)c.w / (float)c.nw;
  const float sy = fmaxf(rh * (iy + 0.5f) - 0.5f, 0.f);
  const float sx = fmaxf(rw * (ix + 0.5f) - 0.5f, 0.f);
  const int y0 = (int)sy, x0 = (int)sx;
  const int y1 = y0 + (y0 < c.h - 1 ? 1 : 0), x1 = x0 + (x0 < c.w - 1 ? 1 : 0);
  const float ly1 = sy - y0, ly0 = 1.f - ly1, lx1 = sx - x0, lx0 = 1.f - lx1;
  const uint8_t* r0 = c.img + (int64_t)y0 * c.w * 3;
  const uint8_t* r1 = c.img + (int64_t)y1 * c.w * 3;
#pragma unroll
  for (int ch = 0; ch < 3; ++ch) {
    const float v = ly0 * (lx0 * r0[x0 * 3 + ch] + lx1 * r0[x1 * 3 + ch]) +
                    ly1 * (lx0 * r1[x0 * 3 + ch] + lx1 * r1[x1 * 3 + ch]);
    const float scaled = round_to<T>(v * (2.f / 255.f));
    o[ch * plane] = from_f<T>(scaled - 1.f);
  }
}

// ------------------------------------------------------------------------------------------------
// L2 prefetch of constant data (the action expert's weights) for the GEMM after next. A denoising
// step streams ~35 MB of weights per layer through four GEMMs of 50 rows, each of which leaves
// most of HBM's bandwidth unused. This kernel only issues prefetches. It is launched on a side
// stream as the GEMM before the one that needs the bytes starts (flashrt/ops/native.py,
// prefetch_l2), so the main chain never waits for it. Each thread takes 16 KB chunks: one bulk
// prefetch instruction per chunk on sm_90+ (cp.async.bulk.prefetch.L2), a prefetch per 128-byte
// line elsewhere. Measured on the H100 (csrc/README.md): a CTA with bulk prefetches in flight stays
// resident until they land, so a kernel of the main chain carrying them waits for the bytes; and
// prefetch traffic beside the latency-bound kernels (attention, norms) slows them down more than
// the GEMMs gain. The prefetches go out before griddepcontrol.wait (weights never change); the
// wait at the end keeps the stream's order. A hint: nothing depends on it for correctness.
// ------------------------------------------------------------------------------------------------
constexpr uint64_t kPrefetchChunk = 16384;

__global__ void l2_prefetch_kernel(const char* __restrict__ p, uint64_t bytes) {
  pdl_launch_dependents();
  const uint64_t chunks = (bytes + kPrefetchChunk - 1) / kPrefetchChunk;
  const uint64_t first = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x, step = (uint64_t)gridDim.x * blockDim.x;
  for (uint64_t c = first; c < chunks; c += step) {
    const char* chunk = p + c * kPrefetchChunk;
    const uint32_t size = (uint32_t)min(kPrefetchChunk, bytes - c * kPrefetchChunk);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(chunk), "r"(size) : "memory");
#else
    for (uint32_t o = 0; o < size; o += 128) asm volatile("prefetch.global.L2 [%0];\n" ::"l"(chunk + o));
#endif
  }
  pdl_wait();
}

template <typename F>
void dispatch(int dtype, const char* what, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kFloat16: f(__half{}); break;
    case kBFloat16: f(__nv_bfloat16{}); break;
    default: require(false, what, "unsupported dtype");
  }
}

}  // namespace

void gelu_tanh(int dtype, const void* x, int64_t x_stride, void* out, int rows, int m, bool gated,
               const float* inv_scale, void* stream) {
  require(m % (dtype == kFloat32 ? 4 : 8) == 0, "gelu_tanh", "m must be a multiple of 16 bytes");
  require(inv_scale == nullptr || dtype != kFloat32, "gelu_tanh", "FP8 output is for bf16/fp16 models");
  if (rows == 0 || m == 0) return;
  dispatch(dtype, "gelu_tanh", [&](auto tag) {
    using T = decltype(tag);
    constexpr int threads = 256;
    const int nvec = m / Vec<T>::N;
    dim3 grid((nvec + threads - 1) / threads, rows);
    launch("gelu_tanh", gated ? gelu_tanh_kernel<T, true> : gelu_tanh_kernel<T, false>, grid, threads, 0,
           static_cast<cudaStream_t>(stream), static_cast<const T*>(x), x_stride, static_cast<T*>(out), m, inv_scale);
  });
}

void quantize_int8(int dtype, const void* x, int64_t x_stride, void* q, float* scale, int rows, int rows_out,
                   int width, void* stream) {
  require(width % 8 == 0 && rows_out >= rows, "quantize_int8", "width must be a multiple of 8 and rows_out >= rows");
  if (rows_out == 0) return;
  dispatch(dtype, "quantize_int8", [&](auto tag) {
    using T = decltype(tag);
    launch("quantize_int8", quantize_int8_kernel<T>, rows_out, 256, 0, static_cast<cudaStream_t>(stream),
        static_cast<const T*>(x), x_stride, static_cast<int8_t*>(q), scale, rows, width);
  });
}

void dequantize_int8(int dtype, const int32_t* acc, int64_t acc_stride, const float* row_scale, const float* col_scale,
                     const void* bias, void* out, int64_t out_stride, int rows, int n, void* stream) {
  require(n % 4 == 0 && acc_stride % 4 == 0, "dequantize_int8", "columns and the accumulator's row stride must be multiples of 4");
  if (rows == 0) return;
  dispatch(dtype, "dequantize_int8", [&](auto tag) {
    using T = decltype(tag);
    constexpr int threads = 256;
    dim3 grid((n / 4 + threads - 1) / threads, rows);
    launch("dequantize_int8", dequantize_int8_kernel<T>, grid, threads, 0, static_cast<cudaStream_t>(stream),
        acc, acc_stride, row_scale, col_scale, static_cast<const T*>(bias), static_cast<T*>(out), out_stride, n);
  });
}

void quantize_fp8(int dtype, const void* x, int64_t x_stride, void* out, int rows, int width, const float* inv_scale,
                  void* stream) {
  require(dtype != kFloat32, "quantize_fp8", "FP8 output is for bf16/fp16 models");
  require(width % 8 == 0, "quantize_fp8", "width must be a multiple of 8");
  if (rows == 0) return;
  dispatch(dtype, "quantize_fp8", [&](auto tag) {
    using T = decltype(tag);
    constexpr int threads = 256;
    dim3 grid((width / Vec<T>::N + threads - 1) / threads, rows);
    launch("quantize_fp8", quantize_fp8_kernel<T>, grid, threads, 0, static_cast<cudaStream_t>(stream),
        static_cast<const T*>(x), x_stride, static_cast<uint8_t*>(out), width, inv_scale);
  });
}

void rope_qkv(int dtype, const void* qkv, int64_t qkv_stride, const void* cos, int64_t cos_stride,
              const void* sin, int64_t sin_stride, int rows, int heads, int d, void* q_out,
              void* k_cache, int64_t k_stride, void* v_cache, int64_t v_stride, const int64_t* slots,
              void* stream) {
  require(d % (2 * (dtype == kFloat32 ? 4 : 8)) == 0, "rope_qkv", "head_dim/2 must be a multiple of 16 bytes");
  if (rows == 0) return;
  dispatch(dtype, "rope_qkv", [&](auto tag) {
    using T = decltype(tag);
    launch("rope_qkv", rope_qkv_kernel<T>, rows, 128, 0, static_cast<cudaStream_t>(stream),
        static_cast<const T*>(qkv), qkv_stride, static_cast<const T*>(cos), cos_stride,
        static_cast<const T*>(sin), sin_stride, heads, d, static_cast<T*>(q_out), static_cast<T*>(k_cache),
        k_stride, static_cast<T*>(v_cache), v_stride, slots);
  });
}

void linear_accumulate(int dtype, float* acc, int64_t acc_stride, const void* x, int64_t x_stride,
                       const void* w, int64_t w_stride, const void* b, int rows, int n_out, int k,
                       void* stream) {
  require(k % (dtype == kFloat32 ? 4 : 8) == 0, "linear_accumulate", "k must be a multiple of 16 bytes");
  if (rows == 0 || n_out == 0) return;
  dispatch(dtype, "linear_accumulate", [&](auto tag) {
    using T = decltype(tag);
    constexpr int warps = 8;
    const int64_t items = (int64_t)rows * n_out;
    launch("linear_accumulate", linear_accumulate_kernel<T>, (unsigned)((items + warps - 1) / warps), warps * 32, 0,
           static_cast<cudaStream_t>(stream), acc, acc_stride, static_cast<const T*>(x), x_stride, static_cast<const T*>(w), w_stride,
        static_cast<const T*>(b), rows, n_out, k);
  });
}

void l2_prefetch(const void* ptr, uint64_t bytes, void* stream) {
  require(reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && bytes % 16 == 0, "l2_prefetch",
          "the range must be 16-byte aligned and a multiple of 16 bytes long");
  const uint64_t chunks = (bytes + kPrefetchChunk - 1) / kPrefetchChunk;
  if (chunks == 0) return;
  // One warp per block, about a chunk per thread, spread over the SMs.
  const unsigned blocks = (unsigned)std::min<uint64_t>((chunks + 31) / 32, 132);
  launch("l2_prefetch", l2_prefetch_kernel, blocks, 32, 0, static_cast<cudaStream_t>(stream),
         static_cast<const char*>(ptr), bytes);
}

bool set_programmatic_launch(bool on) {
  programmatic_launch_enabled() = on;
  return programmatic_launch_supported();
}

void images_to_model(int dtype, const CameraImage* cams, int n, void* out, int size, void* stream) {
  require(n >= 0 && n <= kMaxCameras, "images_to_model", "at most 8 cameras per launch");
  if (n == 0) return;
  CameraBatch batch{};
  for (int i = 0; i < n; ++i) {
    const CameraImage& c = cams[i];
    require(c.h > 0 && c.w > 0 && c.nh > 0 && c.nw > 0 && c.nh <= size && c.nw <= size && c.top >= 0 &&
                c.left >= 0 && c.top + c.nh <= size && c.left + c.nw <= size,
            "images_to_model", "bad image geometry");
    batch.cam[i] = c;
  }
  dispatch(dtype, "images_to_model", [&](auto tag) {
    using T = decltype(tag);
    constexpr int threads = 256;
    dim3 grid((size * size + threads - 1) / threads, n);
    launch("images_to_model", images_to_model_kernel<T>, grid, threads, 0, static_cast<cudaStream_t>(stream), batch,
           static_cast<T*>(out), size);
  });
}

}  // namespace flashrt
