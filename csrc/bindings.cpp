// pybind11 module flashrt._kernels: thin wrappers that turn Python ints (device pointers from
// tensor.data_ptr(), the stream from torch.cuda.current_stream().cuda_stream) into the launchers'
// arguments. No torch headers; the Python wrappers in flashrt/ops/native.py check shapes, dtypes
// and layouts. A null pointer is passed as 0.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels.h"

#ifndef FLASHRT_ARCHS
#error "FLASHRT_ARCHS (comma-separated list such as \"sm_87,sm_90\") must be defined by the build"
#endif
#ifndef FLASHRT_CUDA_VERSION
#define FLASHRT_CUDA_VERSION ""
#endif
#ifndef FLASHRT_REQUESTED_ARCHS
#define FLASHRT_REQUESTED_ARCHS ""
#endif

namespace py = pybind11;
using flashrt::CameraImage;

namespace {

void* P(std::uintptr_t p) { return reinterpret_cast<void*>(p); }

std::vector<std::string> archs() {
  std::vector<std::string> out;
  std::string s = FLASHRT_ARCHS, cur;
  for (char ch : s) {
    if (ch == ',') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else if (ch != ' ') {
      cur.push_back(ch);
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

}  // namespace

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "FlashRT native CUDA kernels (raw device pointers, sizes and a CUDA stream)";
  m.def("archs", &archs, "Compiled GPU targets, e.g. ['sm_87', 'sm_90'].");
  m.attr("cuda_version") = FLASHRT_CUDA_VERSION;        // nvcc that built the module
  m.attr("requested_archs") = FLASHRT_REQUESTED_ARCHS;  // FLASHRT_CUDA_ARCHS at build time ("" = default)
  m.attr("max_cameras") = flashrt::kMaxCameras;

  m.def("set_programmatic_launch", &flashrt::set_programmatic_launch, py::arg("on"),
        "Programmatic dependent launch (sm_90+) for the kernels launched from now on (default on; off to measure "
        "it). Returns whether the current device supports it.");

  m.def("norm",
        [](int dtype, std::uintptr_t x, int64_t x_stride, std::uintptr_t y, int64_t y_stride, int y_splits,
           int64_t y_split_stride, std::uintptr_t gate, std::uintptr_t scale, std::uintptr_t shift, std::uintptr_t out,
           int64_t out_stride, int rows, int width, float eps, int residual, bool layer_norm, std::uintptr_t inv_scale,
           std::uintptr_t stream) {
          flashrt::norm(dtype, P(x), x_stride, P(y), y_stride, y_splits, y_split_stride, P(gate), P(scale), P(shift),
                        P(out), out_stride, rows, width, eps, residual, layer_norm,
                        reinterpret_cast<const float*>(inv_scale), P(stream));
        },
        "Residual (none / add / gated) + RMSNorm or LayerNorm + optional scale/shift, one pass; FP8 output "
        "when inv_scale is set.");

  m.def("gelu_tanh",
        [](int dtype, std::uintptr_t x, int64_t x_stride, std::uintptr_t out, int rows, int m, bool gated,
           std::uintptr_t inv_scale, std::uintptr_t stream) {
          flashrt::gelu_tanh(dtype, P(x), x_stride, P(out), rows, m, gated, reinterpret_cast<const float*>(inv_scale),
                             P(stream));
        },
        "GeGLU on [gate | up] (gated) or plain tanh GELU; FP8 output when inv_scale is set.");

  m.def("quantize_int8",
        [](int dtype, std::uintptr_t x, int64_t x_stride, std::uintptr_t q, std::uintptr_t scale, int rows, int rows_out,
           int width, std::uintptr_t stream) {
          flashrt::quantize_int8(dtype, P(x), x_stride, P(q), reinterpret_cast<float*>(scale), rows, rows_out, width,
                                 P(stream));
        });

  m.def("dequantize_int8",
        [](int dtype, std::uintptr_t acc, int64_t acc_stride, std::uintptr_t row_scale, std::uintptr_t col_scale,
           std::uintptr_t bias, std::uintptr_t out, int64_t out_stride, int rows, int n, std::uintptr_t stream) {
          flashrt::dequantize_int8(dtype, reinterpret_cast<const int32_t*>(acc), acc_stride,
                                   reinterpret_cast<const float*>(row_scale), reinterpret_cast<const float*>(col_scale),
                                   P(bias), P(out), out_stride, rows, n, P(stream));
        });

  m.def("quantize_fp8",
        [](int dtype, std::uintptr_t x, int64_t x_stride, std::uintptr_t out, int rows, int width, std::uintptr_t inv_scale,
           std::uintptr_t stream) {
          flashrt::quantize_fp8(dtype, P(x), x_stride, P(out), rows, width, reinterpret_cast<const float*>(inv_scale),
                                P(stream));
        });

  m.def("rope_qkv",
        [](int dtype, std::uintptr_t qkv, int64_t qkv_stride, std::uintptr_t cos, int64_t cos_stride, std::uintptr_t sin,
           int64_t sin_stride, int rows, int heads, int d, std::uintptr_t q_out, std::uintptr_t k_cache, int64_t k_stride,
           std::uintptr_t v_cache, int64_t v_stride, std::uintptr_t slots, std::uintptr_t stream) {
          flashrt::rope_qkv(dtype, P(qkv), qkv_stride, P(cos), cos_stride, P(sin), sin_stride, rows, heads, d, P(q_out),
                            P(k_cache), k_stride, P(v_cache), v_stride, reinterpret_cast<const int64_t*>(slots),
                            P(stream));
        });

  m.def("linear_accumulate",
        [](int dtype, std::uintptr_t acc, int64_t acc_stride, std::uintptr_t x, int64_t x_stride, std::uintptr_t w,
           int64_t w_stride, std::uintptr_t b, int rows, int n_out, int k, std::uintptr_t stream) {
          flashrt::linear_accumulate(dtype, reinterpret_cast<float*>(acc), acc_stride, P(x), x_stride, P(w), w_stride,
                                     P(b), rows, n_out, k, P(stream));
        });

  // cams: list of (ptr, h, w, nh, nw, top, left, slot)
  m.def("images_to_model",
        [](int dtype, const std::vector<std::vector<int64_t>>& cams, std::uintptr_t out, int size, std::uintptr_t stream) {
          std::vector<CameraImage> c;
          for (const auto& t : cams) {
            if (t.size() != 8) throw std::invalid_argument("flashrt._kernels.images_to_model: camera tuples have 8 fields");
            c.push_back(CameraImage{reinterpret_cast<const uint8_t*>(static_cast<std::uintptr_t>(t[0])),
                                    static_cast<int>(t[1]), static_cast<int>(t[2]), static_cast<int>(t[3]),
                                    static_cast<int>(t[4]), static_cast<int>(t[5]), static_cast<int>(t[6]),
                                    static_cast<int>(t[7])});
          }
          for (size_t i = 0; i < c.size(); i += flashrt::kMaxCameras) {
            const int n = static_cast<int>(std::min<size_t>(flashrt::kMaxCameras, c.size() - i));
            flashrt::images_to_model(dtype, c.data() + i, n, P(out), size, P(stream));
          }
        });

  m.def("attention_decode",
        [](int dtype, std::uintptr_t q, int64_t q_stride, std::uintptr_t k, int64_t k_stride, std::uintptr_t v,
           int64_t v_stride, std::uintptr_t out, int64_t out_stride, int rows, int n_keys, std::uintptr_t cu_q,
           std::uintptr_t cu_k, std::uintptr_t key_mask, int warps, int splits, std::uintptr_t part_o,
           std::uintptr_t part_ml, std::uintptr_t inv_scale, int fresh_tail, std::uintptr_t stream) {
          flashrt::attention_decode(dtype, P(q), q_stride, P(k), k_stride, P(v), v_stride, P(out), out_stride, rows,
                                    n_keys, reinterpret_cast<const int32_t*>(cu_q), reinterpret_cast<const int32_t*>(cu_k),
                                    reinterpret_cast<const bool*>(key_mask), warps, splits, reinterpret_cast<float*>(part_o),
                                    reinterpret_cast<float*>(part_ml), reinterpret_cast<const float*>(inv_scale),
                                    fresh_tail, P(stream));
        });

  m.def("l2_prefetch",
        [](std::uintptr_t ptr, uint64_t bytes, std::uintptr_t stream) {
          flashrt::l2_prefetch(P(ptr), bytes, P(stream));
        },
        "Prefetch a range of constant device memory into L2 (a hint; changes no result).");

  m.def("skinny_gemm_partials",
        [](int dtype, std::uintptr_t x, int64_t x_stride, std::uintptr_t wt, int rows, int k, int n, int splits, int wf,
           int ksplit, std::uintptr_t part, std::uintptr_t stream) {
          flashrt::skinny_gemm_partials(dtype, P(x), x_stride, P(wt), rows, k, n, splits, wf, ksplit,
                                        reinterpret_cast<float*>(part), P(stream));
        },
        "Split-K fp32 partials of x @ w.T for few rows, w pre-tiled (flashrt.quant.tile_skinny_weight).");
}
