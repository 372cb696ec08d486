// Shared helpers for the FlashRT kernels: dtype codes, 16-byte vector loads/stores, warp/block
// reductions, and the one launch path every kernel goes through.
//
// Every kernel in csrc/ takes raw device pointers, sizes and a cudaStream_t: no torch headers, no
// host synchronization, no allocation. That keeps each launch capturable in a CUDA graph. The host
// launchers throw std::runtime_error (RuntimeError in Python) when a launch fails, and
// std::invalid_argument (ValueError) when the arguments are outside what a kernel supports.
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

namespace flashrt {

// dtype codes shared with flashrt/ops/native.py
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline void require(bool ok, const char* what, const char* msg) {
  if (!ok) throw std::invalid_argument(std::string("flashrt._kernels.") + what + ": " + msg);
}

// ---- launches -----------------------------------------------------------------------------------
// Programmatic dependent launch (PDL, sm_90+). At batch 1 most kernels here run for 2-5 us, and
// the gap between two dependent kernels (the next grid's launch and block scheduling after the
// previous one has drained) is ~1 us of it. A kernel launched with PDL may be scheduled while the
// kernel before it on the stream is still running: its blocks start, then wait in
// griddepcontrol.wait until that grid has completed and its writes are visible. So every kernel
// begins with pdl_prologue(), before it touches global memory: correctness never depends on where
// the trigger sits. The trigger at the same place lets the next kernel of ours launch as soon as
// all of this grid's blocks are resident. Kernels launched without PDL (cuBLAS's GEMMs) wait for
// the whole previous grid as usual. Captured into CUDA graphs as programmatic edges (CUDA 12.3+).
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_prologue() {
  pdl_launch_dependents();
  pdl_wait();
}

// Off only to measure what PDL gains (flashrt._kernels.set_programmatic_launch).
inline bool& programmatic_launch_enabled() {
  static bool enabled = true;
  return enabled;
}

// PDL needs sm_90 or newer; the attribute is left off elsewhere. Cached per device.
inline bool programmatic_launch_supported() {
  static signed char known[64] = {};  // 0 unknown, 1 yes, -1 no
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  if (known[dev] == 0) {
    int major = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    known[dev] = major >= 9 ? 1 : -1;
  }
  return known[dev] > 0;
}

// Every kernel launch: with PDL where the device has it, errors thrown as RuntimeError.
template <typename... Params, typename... Args>
void launch(const char* what, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
            Args&&... args) {
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = programmatic_launch_enabled() && programmatic_launch_supported() ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear it: the next launch must not report this one
    throw std::runtime_error(std::string("flashrt._kernels.") + what + ": " + cudaGetErrorString(err));
  }
}

// ---- scalar conversions -------------------------------------------------------------------------
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Round a float to T and back: what a value looks like after it was stored in T.
template <typename T> __device__ __forceinline__ float round_to(float x) { return to_f(from_f<T>(x)); }

// ---- 16-byte vectors ----------------------------------------------------------------------------
// A Vec<T> is one 16-byte load: 8 bf16/fp16 or 4 fp32 elements. All row pointers handed to the
// kernels are checked (Python side) to be 16-byte aligned with row strides that are multiples of
// the vector width, so these loads are always aligned.
template <typename T> struct Vec {
  static constexpr int N = 16 / sizeof(T);
  union { uint4 u; T e[N]; };
};

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[Vec<T>::N]) {
  Vec<T> v;
  v.u = *reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < Vec<T>::N; ++i) f[i] = to_f(v.e[i]);
}

// Read-only variant through the non-coherent (texture) path, for inputs no kernel writes.
template <typename T>
__device__ __forceinline__ void load_vec_ro(const T* p, float (&f)[Vec<T>::N]) {
  Vec<T> v;
  v.u = __ldg(reinterpret_cast<const uint4*>(p));
#pragma unroll
  for (int i = 0; i < Vec<T>::N; ++i) f[i] = to_f(v.e[i]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&f)[Vec<T>::N]) {
  Vec<T> v;
#pragma unroll
  for (int i = 0; i < Vec<T>::N; ++i) v.e[i] = from_f<T>(f[i]);
  *reinterpret_cast<uint4*>(p) = v.u;
}

// FP8 output: the input of an FP8 GEMM, written by the kernel that produces it instead of by a
// separate quantize pass. Each value is first rounded to T (what the unfused kernel would have
// stored), then multiplied by the static inverse scale and converted to E4M3 with saturation to
// +-448 (round to nearest even): exactly quant.quantize_fp8 applied to the T output. On GPUs
// without FP8 hardware (sm_87) the conversion is emulated; FP8 GEMMs do not run there anyway.
template <typename T>
__device__ __forceinline__ __nv_fp8x2_storage_t to_fp8x2(float a, float b, float inv_scale) {
  return __nv_cvt_float2_to_fp8x2(make_float2(round_to<T>(a) * inv_scale, round_to<T>(b) * inv_scale), __NV_SATFINITE,
                                  __NV_E4M3);
}

template <typename T>
__device__ __forceinline__ void store_fp8(uint8_t* p, const float (&f)[Vec<T>::N], float inv_scale) {
  constexpr int N = Vec<T>::N;
  union { __nv_fp8x2_storage_t h[N / 2]; uint2 u2; uint32_t u1; } v;
#pragma unroll
  for (int i = 0; i < N / 2; ++i) v.h[i] = to_fp8x2<T>(f[2 * i], f[2 * i + 1], inv_scale);
  if constexpr (N == 8) *reinterpret_cast<uint2*>(p) = v.u2;
  else *reinterpret_cast<uint32_t*>(p) = v.u1;
}

// ---- reductions ---------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024). Every thread gets the
// result. `scratch` holds 33 floats; the trailing __syncthreads lets the caller reuse it at once.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < nwarps ? scratch[lane] : 0.f;
    t = warp_sum(t);
    if (lane == 0) scratch[32] = t;
  }
  __syncthreads();
  float r = scratch[32];
  __syncthreads();
  return r;
}

// Maximum over the whole block, as block_sum.
__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < nwarps ? scratch[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, o));
    if (lane == 0) scratch[32] = t;
  }
  __syncthreads();
  float r = scratch[32];
  __syncthreads();
  return r;
}

}  // namespace flashrt
