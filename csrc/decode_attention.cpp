// engine._decode_attention: attention for one query per row on the CPU (a decode step), what the
// torch backend uses instead of PyTorch's SDPA there (engine/backends.py says when). The loops are
// in attention.h; at batch 64 on the 6-layer/192-wide benchmark model a step reads ~50 MB of
// float32 cache, which PyTorch's CPU flash kernel (SDPA) did at about 5 GB/s in the model, and
// this code at about 12.
//
//   q: [B, H, 1, D]   k, v: [B, Hkv, S, D] (any strides, D contiguous; Hkv divides H) -> out [B, 1, H, D]
//   row b attends to keys [kv_start[b], kv_lens[b]) (kv_start 0, kv_lens S when not given)
//   new_k, new_v [B, Hkv, 1, D], optional: this step's key and value, written into column `at` of
//   k and v (the KV cache) before attending over keys [kv_start[b], at + 1): appending and
//   attending in one call saves a small decode step the half-dozen ops of writing the cache
//
// (row, head) pairs are spread over torch's OpenMP threads (parallel.h) when there is enough to read.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention.h"
#include "parallel.h"
#include "tensor_view.h"

namespace py = pybind11;
using tensor_view::Tensor;

namespace {

void check_4d(const Tensor& t, const char* name, int64_t B, int64_t H, int64_t S, int64_t D, int64_t itemsize) {
    const bool ok = t.shape.size() == 4 && t.shape[0] == B && t.shape[1] == H && t.shape[2] == S && t.shape[3] == D &&
                    t.strides[3] == 1 && t.itemsize == itemsize;
    if (!ok)
        throw std::invalid_argument(std::string(name) + " must be [B=" + std::to_string(B) + ", " + std::to_string(H) + ", " +
                                    std::to_string(S) + ", D=" + std::to_string(D) + "] of q's dtype, its last dimension contiguous");
}

// Row b's key range [lo[b], hi[b]) from kv_start / kv_lens (int64 [B] tensors or None), checked.
void key_ranges(const py::handle& kv_start, const py::handle& kv_lens, int64_t B, int64_t S, int64_t end,
                std::vector<int64_t>& lo, std::vector<int64_t>& hi) {
    lo.assign(B, 0);
    hi.assign(B, end);
    for (auto [obj, name, out] : {std::tuple{kv_start, "kv_start", &lo}, std::tuple{kv_lens, "kv_lens", &hi}}) {
        if (obj.is_none()) continue;
        const Tensor t(obj);
        if (t.shape.size() != 1 || t.shape[0] != B || t.itemsize != 8)
            throw std::invalid_argument(std::string(name) + " must be an int64 tensor [B=" + std::to_string(B) + "]");
        for (int64_t b = 0; b < B; ++b) (*out)[b] = *t.at<int64_t>(b);
    }
    for (int64_t b = 0; b < B; ++b)
        if (lo[b] < 0 || hi[b] > S || lo[b] >= hi[b])
            throw std::invalid_argument("row " + std::to_string(b) + " would attend to keys [" + std::to_string(lo[b]) +
                                        ", " + std::to_string(hi[b]) + "): need 0 <= kv_start < kv_lens <= S=" +
                                        std::to_string(S));
}

// Writes new_k, new_v [B, Hkv, 1, D] into column `at` of the caches k, v [B, Hkv, S, D].
template <class T>
void append_column(const Tensor& new_k, const Tensor& new_v, const Tensor& k, const Tensor& v, int64_t at) {
    const int64_t B = k.shape[0], Hkv = k.shape[1], D = k.shape[3];
    for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < Hkv; ++h) {
            std::copy_n(new_k.at<T>(b, h), D, k.at<T>(b, h, at));
            std::copy_n(new_v.at<T>(b, h), D, v.at<T>(b, h, at));
        }
}

template <class T>
py::array_t<T> attend_all(const Tensor& q, const Tensor& k, const Tensor& v, const std::vector<int64_t>& lo,
                          const std::vector<int64_t>& hi, double scale, int threads) {
    const int64_t B = q.shape[0], H = q.shape[1], D = q.shape[3];
    py::array_t<T> out({B, int64_t{1}, H, D});  // [B, 1, H, D]: heads side by side, as the next matmul reads them
    const auto heads = [](const Tensor& t) {
        return attention::Heads<T>{t.at<T>(0), t.strides[0], t.strides[1], t.strides[2]};
    };
    T* out_data = out.mutable_data();
    {
        py::gil_scoped_release release;
        attention::attend_rows<T>(heads(q), heads(k), heads(v), B, H, H / k.shape[1], D, lo.data(), hi.data(),
                                  static_cast<T>(scale), threads, out_data);
    }
    return out;
}

// q, k, v, new_k, new_v: CPU float32 or float64 tensors (the caller checks device and dtype; here
// shapes, strides and matching element sizes are checked before anything is read or written).
py::array decode_attention(const py::handle& q_obj, const py::handle& k_obj, const py::handle& v_obj,
                           const py::handle& kv_start, const py::handle& kv_lens, double scale, int threads,
                           const py::handle& new_k_obj, const py::handle& new_v_obj, int64_t at) {
    const Tensor q(q_obj), k(k_obj), v(v_obj);
    if (q.shape.size() != 4 || q.shape[2] != 1 || q.strides[3] != 1 || (q.itemsize != 4 && q.itemsize != 8))
        throw std::invalid_argument("q must be a float32 or float64 [B, H, 1, D], its last dimension contiguous");
    const int64_t B = q.shape[0], H = q.shape[1], D = q.shape[3];
    const int64_t Hkv = k.shape.size() == 4 ? k.shape[1] : 0, S = k.shape.size() == 4 ? k.shape[2] : 0;
    if (Hkv < 1 || H % Hkv != 0)
        throw std::invalid_argument("k and v must be [B, Hkv, S, D], with Hkv dividing q's H=" + std::to_string(H));
    check_4d(k, "k", B, Hkv, S, D, q.itemsize);
    check_4d(v, "v", B, Hkv, S, D, q.itemsize);
    // with new_k, new_v: this step's keys and values, written into column `at` of k, v first
    const bool append = !new_k_obj.is_none();
    if (append != !new_v_obj.is_none()) throw std::invalid_argument("new_k and new_v go together");
    if (append && !kv_lens.is_none()) throw std::invalid_argument("kv_lens is at + 1 when appending");
    if (append && (at < 0 || at >= S))
        throw std::invalid_argument("at=" + std::to_string(at) + " is not a column of the cache [0, S=" + std::to_string(S) + ")");
    std::vector<int64_t> lo, hi;
    key_ranges(kv_start, kv_lens, B, S, append ? at + 1 : S, lo, hi);
    std::optional<Tensor> new_k, new_v;
    if (append) {
        new_k.emplace(new_k_obj), new_v.emplace(new_v_obj);
        check_4d(*new_k, "new_k", B, Hkv, 1, D, q.itemsize);
        check_4d(*new_v, "new_v", B, Hkv, 1, D, q.itemsize);
    }
    if (q.itemsize == 4) {
        if (append) append_column<float>(*new_k, *new_v, k, v, at);
        return attend_all<float>(q, k, v, lo, hi, scale, threads);
    }
    if (append) append_column<double>(*new_k, *new_v, k, v, at);
    return attend_all<double>(q, k, v, lo, hi, scale, threads);
}

}  // namespace

PYBIND11_MODULE(_decode_attention, m) {
    m.doc() = "Attention for one query per row (decode steps) on the CPU; see csrc/decode_attention.cpp.";
    m.def("pool_calls", [] { return parallel::calls.load(); }, "Calls handed to torch's OpenMP threads so far.");
    m.def("decode_attention", &decode_attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("kv_start"),
          py::arg("kv_lens"), py::arg("scale"), py::arg("threads"), py::arg("new_k") = py::none(),
          py::arg("new_v") = py::none(), py::arg("at") = -1,
          "Attention of q [B, H, 1, D] over k, v [B, Hkv, S, D] (CPU float32/float64 tensors) -> [B, 1, H, D] array.");
}
