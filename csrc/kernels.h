// Host launchers of the FlashRT kernels. Plain C++ (no CUDA headers) so that bindings.cpp builds
// with the host compiler: device pointers are `void*`, the stream is a `void*` holding a
// cudaStream_t. Each launcher enqueues its kernel(s) on the stream and returns at once; it throws
// std::invalid_argument for unsupported arguments and std::runtime_error when a launch fails.
// Sizes and strides are in elements. dtype: 0 fp32, 1 fp16, 2 bf16 (common.cuh).
#pragma once

#include <cstdint>

namespace flashrt {

// Residual modes of the norm kernel.
enum ResidualMode : int { kResNone = 0, kResAdd = 1, kResGated = 2 };

// One pass over rows of `width` elements:
//   residual: x += y (kResAdd) or x += gate * y (kResGated), written back to x in place;
//   norm:     RMS (x * rsqrt(mean(x^2) + eps)) or LayerNorm ((x - mean) * rsqrt(var + eps));
//   affine:   out = norm * scale + shift (scale/shift [width]; null = no affine).
// Statistics in fp32 over the residual after it was rounded to the dtype (what the in-place add
// leaves in x), one rounding of the output.
// FP8 output (bf16/fp16 only): with inv_scale (a device float) set, out holds one byte per element,
// e4m3(round_to_dtype(out) * *inv_scale) saturated to +-448: the input of an FP8 projection.
// y_splits > 0: y is fp32 split-K partials [y_splits] (split stride y_split_stride, row stride y_stride,
// in floats), summed and rounded to the dtype first (the output of skinny_gemm_partials).
// gate, scale, shift and inv_scale are parameters: the kernel reads them before its PDL wait, so
// the kernel launched just before must not write them (x and y it may).
void norm(int dtype, void* x, int64_t x_stride, const void* y, int64_t y_stride, int y_splits, int64_t y_split_stride,
          const void* gate, const void* scale, const void* shift, void* out, int64_t out_stride, int rows, int width,
          float eps, int residual, bool layer_norm, const float* inv_scale, void* stream);

// GeGLU (gated): out[t, j] = gelu_tanh(x[t, j]) * x[t, m + j], x [rows, 2m]; else out[t, j] =
// gelu_tanh(x[t, j]), x [rows, m]; row stride x_stride, out [rows, m] contiguous; FP8 output with
// inv_scale as for norm.
void gelu_tanh(int dtype, const void* x, int64_t x_stride, void* out, int rows, int m, bool gated,
               const float* inv_scale, void* stream);

// INT8 W8A8 around torch._int_mm: per-token quantization of x [rows, width] into q int8
// [rows_out, width] (rows past `rows` zeroed: _int_mm's minimum height) and scale float32 [rows];
// and out [rows, n] = dtype(acc int32 [rows, n] * row_scale[r] * col_scale[n] + bias[n]) (bias may be
// null). Exactly quant.quantize_per_token and QuantWeight's dequantization.
void quantize_int8(int dtype, const void* x, int64_t x_stride, void* q, float* scale, int rows, int rows_out,
                   int width, void* stream);
void dequantize_int8(int dtype, const int32_t* acc, int64_t acc_stride, const float* row_scale, const float* col_scale,
                     const void* bias, void* out, int64_t out_stride, int rows, int n, void* stream);

// out8[t, j] = e4m3(x[t, j] * *inv_scale), saturated; x [rows, width] bf16/fp16, out8 contiguous.
void quantize_fp8(int dtype, const void* x, int64_t x_stride, void* out8, int rows, int width, const float* inv_scale,
                  void* stream);

// Rotary embedding of a fused QKV row [(heads + 2) * d] with one KV head:
//   rope(x)[i] = x[i] * cos[i] + x[(i + d/2) % d] * sin[i]   (sin = [-sin | sin], split-half)
// q -> q_out [rows, heads, d] (contiguous); rope(k) and v -> row slots[t] (t if slots is null) of
// k_cache / v_cache.
void rope_qkv(int dtype, const void* qkv, int64_t qkv_stride, const void* cos, int64_t cos_stride,
              const void* sin, int64_t sin_stride, int rows, int heads, int d, void* q_out,
              void* k_cache, int64_t k_stride, void* v_cache, int64_t v_stride, const int64_t* slots,
              void* stream);

// acc[r, o] += sum_k x[r, k] * w[o, k] + b[o]   (acc fp32; x, w, b in dtype; b may be null).
void linear_accumulate(int dtype, float* acc, int64_t acc_stride, const void* x, int64_t x_stride,
                       const void* w, int64_t w_stride, const void* b, int rows, int n_out, int k,
                       void* stream);

// Resize-with-pad of up to kMaxCameras uint8 HxWx3 images into out [C, 3, size, size] (dtype),
// scaled to [-1, 1], pad -1; one launch for all of them.
constexpr int kMaxCameras = 8;
struct CameraImage {
  const uint8_t* img;  // [h, w, 3] contiguous
  int h, w;            // input size
  int nh, nw;          // resized size (resize_with_pad_geometry)
  int top, left;       // placement in the output square
  int slot;            // output slot in [0, C)
};
void images_to_model(int dtype, const CameraImage* cams, int n, void* out, int size, void* stream);

// Split-K ("flash-decoding") attention of R query rows (heads folded into rows, already scaled)
// against one KV head, head dim 256. Keys [0, n_k) with n_k = cu_k[1] (device int32) clamped to
// n_keys, or all n_keys keys under key_mask (device bool [n_keys]) when cu_k is null. Query rows
// at or past cu_q[1] (when cu_q is given) are left unwritten. A CTA of `warps` (2 or 4) warps
// takes a tile of 16 x warps query rows; `splits` (<= 32) CTAs share the keys of one tile. With
// splits > 1 the partial results go to workspace `part_o` (fp32 [splits, R, 256]) and `part_ml`
// (fp32 [splits, R, 2]) and a second kernel combines them. FP8 output as for norm: with inv_scale
// set, out holds one byte per element (out_stride in bytes), the input of an FP8 o projection.
// fresh_tail >= 0: only the last fresh_tail valid keys (and q) come from the kernel just before, so
// K/V tiles before them may be loaded while it drains (PDL); < 0: any input may.
void attention_decode(int dtype, const void* q, int64_t q_stride, const void* k, int64_t k_stride,
                      const void* v, int64_t v_stride, void* out, int64_t out_stride, int rows,
                      int n_keys, const int32_t* cu_q, const int32_t* cu_k, const bool* key_mask,
                      int warps, int splits, float* part_o, float* part_ml, const float* inv_scale, int fresh_tail,
                      void* stream);

// L2 prefetch hint for `bytes` of constant device memory at `ptr` (16-byte aligned, a multiple of
// 16 bytes): the weights of a GEMM that runs a little later. Changes no result.
void l2_prefetch(const void* ptr, uint64_t bytes, void* stream);

// Split-K GEMM for few rows (<= 56) against a weight pre-tiled by flashrt.quant.tile_skinny_weight:
//   part[s, r, j] = sum over k in split s of x[r, k] * w[j, k]   (fp32 [splits, rows, n], contiguous)
// x bf16 [rows, k] (row stride x_stride); wt the tiled w [n, k] for `wf` (4 or 8: 16 wf features per CTA);
// ksplit (1 or 2) warp groups per CTA take its k chunks in turn. The consumer sums the splits.
void skinny_gemm_partials(int dtype, const void* x, int64_t x_stride, const void* wt, int rows, int k, int n,
                          int splits, int wf, int ksplit, float* part, void* stream);

// Programmatic dependent launch (sm_90+, common.cuh) for every kernel launched from now on: on by
// default; off only to measure what it gains. Returns whether this device uses it when on.
bool set_programmatic_launch(bool on);

}  // namespace flashrt
