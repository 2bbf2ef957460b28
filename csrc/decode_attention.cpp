// engine._decode_attention: attention for one query per row on the CPU (a decode step), what the
// torch backend uses instead of PyTorch's SDPA there (engine/backends.py says when).
//
// A decode step's attention reads every cached key and value once and does two multiply-adds per
// element read, so it is bound by memory: at batch 64 on the 6-layer/192-wide benchmark model it
// reads ~50 MB of float32 cache per step. PyTorch's CPU flash kernel spends most of its time
// around tiny GEMM calls at Sq = 1 (about 5 GB/s). Here each (row, query head) streams its keys
// once to get the scores, then its values once to sum them, with nothing but a score buffer in
// between: the two passes of a textbook softmax, not an online one, because a row's scores fit
// in L1/L2 and the exponentials can then run vectorised over all of them at once.
//
//   q: [B, H, 1, D]   k, v: [B, Hkv, S, D] (any strides, D contiguous; Hkv divides H) -> out [B, 1, H, D]
//   row b attends to keys [kv_start[b], kv_lens[b]) (kv_start 0, kv_lens S when not given)
//   new_k, new_v [B, Hkv, 1, D], optional: this step's key and value, written into column `at` of
//   k and v (the KV cache) before attending over keys [kv_start[b], at + 1): appending and
//   attending in one call saves a small decode step the half-dozen ops of writing the cache
//
// Rows are spread over the shared worker pool (worker_pool.h) when there is enough to read.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "worker_pool.h"

namespace py = pybind11;

namespace {

template <class T>
using Array = py::array_t<T, 0>;  // no forcecast: a float64 array is not silently copied to float32

// Vector-width clones picked at load time: the package is built for the baseline x86-64, the
// loops here want AVX2 / AVX-512 where the machine has them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

template <class T>
struct View4 {  // a [B, H, S, D] array's pointer and element strides (D's is 1)
    const T* data;
    int64_t sb, sh, ss;
};

template <class T>
View4<T> view_of(const Array<T>& a, const char* name, int64_t D) {
    if (a.ndim() != 4 || a.shape(3) != D || a.strides(3) != static_cast<py::ssize_t>(sizeof(T)))
        throw std::invalid_argument(std::string(name) + " must be [B, H, S, D=" + std::to_string(D) +
                                    "] with its last dimension contiguous");
    const auto s = [&](int i) { return static_cast<int64_t>(a.strides(i) / static_cast<py::ssize_t>(sizeof(T))); };
    return {a.data(), s(0), s(1), s(2)};
}

// One (row, head): out = softmax(scale · K q) V over keys [lo, hi). scratch: hi - lo + D values.
// DIM > 0 fixes the head dimension at compile time (the loops over it unroll into registers);
// DIM = 0 reads it from D.
template <class T, int DIM>
VECTOR_CLONES void attend_one(const T* __restrict q, const T* __restrict k, const T* __restrict v, int64_t ss,
                              int64_t lo, int64_t hi, int64_t D, T scale, T* __restrict scratch, T* __restrict out) {
    const int64_t dim = DIM > 0 ? DIM : D, n = hi - lo;
    T* scores = scratch;
    k += lo * ss;
    v += lo * ss;
    // scores, four keys at a time: four independent sums to reduce, not one long chain per key
    int64_t s = 0;
    for (; s + 4 <= n; s += 4) {
        const T *k0 = k + s * ss, *k1 = k0 + ss, *k2 = k1 + ss, *k3 = k2 + ss;
        T d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
        for (int64_t d = 0; d < dim; ++d) {
            d0 += q[d] * k0[d];
            d1 += q[d] * k1[d];
            d2 += q[d] * k2[d];
            d3 += q[d] * k3[d];
        }
        scores[s] = d0 * scale, scores[s + 1] = d1 * scale, scores[s + 2] = d2 * scale, scores[s + 3] = d3 * scale;
    }
    for (; s < n; ++s) {
        const T* ks = k + s * ss;
        T dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < dim; ++d) dot += q[d] * ks[d];
        scores[s] = dot * scale;
    }
    T best = scores[0];
    for (s = 1; s < n; ++s) best = std::max(best, scores[s]);
    T total = 0;
#pragma omp simd reduction(+ : total)
    for (s = 0; s < n; ++s) {
        scores[s] = std::exp(scores[s] - best);
        total += scores[s];
    }
    // out = Σ p_s v_s, accumulated in a local array the compiler can keep in registers (DIM > 0)
    T fixed[DIM > 0 ? DIM : 1];
    T* acc = DIM > 0 ? fixed : scratch + n;
    for (int64_t d = 0; d < dim; ++d) acc[d] = 0;
    for (s = 0; s < n; ++s) {
        const T* vs = v + s * ss;
        const T p = scores[s];
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) acc[d] += p * vs[d];
    }
    const T inv = T(1) / total;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) out[d] = acc[d] * inv;
}

// attend_one for the head dimensions models use, the general loop for the rest
template <class T>
void attend_any(const T* q, const T* k, const T* v, int64_t ss, int64_t lo, int64_t hi, int64_t D, T scale, T* scratch,
                T* out) {
    switch (D) {
        case 32: return attend_one<T, 32>(q, k, v, ss, lo, hi, D, scale, scratch, out);
        case 64: return attend_one<T, 64>(q, k, v, ss, lo, hi, D, scale, scratch, out);
        case 128: return attend_one<T, 128>(q, k, v, ss, lo, hi, D, scale, scratch, out);
        default: return attend_one<T, 0>(q, k, v, ss, lo, hi, D, scale, scratch, out);
    }
}

using Lengths = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

template <class T>
py::array_t<T> decode_attention(const Array<T>& q_arr, Array<T>& k_arr, Array<T>& v_arr,
                      const py::object& kv_start_obj, const py::object& kv_lens_obj, double scale, int threads,
                      const py::object& new_k_obj, const py::object& new_v_obj, int64_t at) {
    if (q_arr.ndim() != 4 || q_arr.shape(2) != 1) throw std::invalid_argument("q must be [B, H, 1, D]");
    const int64_t B = q_arr.shape(0), H = q_arr.shape(1), D = q_arr.shape(3);
    const auto q = view_of(q_arr, "q", D), k = view_of(k_arr, "k", D), v = view_of(v_arr, "v", D);
    const int64_t Hkv = k_arr.shape(1), S = k_arr.shape(2);
    if (k_arr.shape(0) != B || v_arr.shape(0) != B || v_arr.shape(1) != Hkv || v_arr.shape(2) != S || Hkv < 1 ||
        H % Hkv != 0)
        throw std::invalid_argument("k and v must be [B, Hkv, S, D] alike, with Hkv dividing q's H");
    py::array_t<T> out_arr({B, int64_t{1}, H, D});  // [B, 1, H, D]: heads side by side, as the next matmul reads them
    T* out_data = out_arr.mutable_data();
    // with new_k, new_v: this step's keys and values, written into column `at` of k, v first
    const bool append = !new_k_obj.is_none();
    if (append != !new_v_obj.is_none()) throw std::invalid_argument("new_k and new_v go together");
    if (append && !kv_lens_obj.is_none()) throw std::invalid_argument("kv_lens is at + 1 when appending");
    if (append && (at < 0 || at >= S))
        throw std::invalid_argument("at=" + std::to_string(at) + " is not a column of the cache [0, S=" + std::to_string(S) + ")");
    if (append) {
        const auto new_k_arr = new_k_obj.cast<Array<T>>(), new_v_arr = new_v_obj.cast<Array<T>>();
        for (const auto* a : {&new_k_arr, &new_v_arr})
            if (a->ndim() != 4 || a->shape(0) != B || a->shape(1) != Hkv || a->shape(2) != 1)
                throw std::invalid_argument("new_k and new_v must be [B, Hkv, 1, D]");
        const auto nk = view_of(new_k_arr, "new_k", D), nv = view_of(new_v_arr, "new_v", D);
        T* k_data = k_arr.mutable_data();
        T* v_data = v_arr.mutable_data();
        for (int64_t b = 0; b < B; ++b)
            for (int64_t h = 0; h < Hkv; ++h) {
                std::copy_n(nk.data + b * nk.sb + h * nk.sh, D, k_data + b * k.sb + h * k.sh + at * k.ss);
                std::copy_n(nv.data + b * nv.sb + h * nv.sh, D, v_data + b * v.sb + h * v.sh + at * v.ss);
            }
    }
    // each row's key range, checked before any work
    std::vector<int64_t> lo(B, 0), hi(B, append ? at + 1 : S);
    if (!kv_start_obj.is_none()) {
        const auto a = kv_start_obj.cast<Lengths>();
        if (a.ndim() != 1 || a.shape(0) != B) throw std::invalid_argument("kv_start must be [B]");
        std::copy(a.data(), a.data() + B, lo.begin());
    }
    if (!kv_lens_obj.is_none()) {
        const auto a = kv_lens_obj.cast<Lengths>();
        if (a.ndim() != 1 || a.shape(0) != B) throw std::invalid_argument("kv_lens must be [B]");
        std::copy(a.data(), a.data() + B, hi.begin());
    }
    for (int64_t b = 0; b < B; ++b)
        if (lo[b] < 0 || hi[b] > S || lo[b] >= hi[b])
            throw std::invalid_argument("row " + std::to_string(b) + " would attend to keys [" + std::to_string(lo[b]) +
                                        ", " + std::to_string(hi[b]) + "): need 0 <= kv_start < kv_lens <= S=" +
                                        std::to_string(S));
    const int64_t group = H / Hkv;
    auto task = [&](int64_t bh) {
        thread_local std::vector<T> scratch;
        const int64_t b = bh / H, h = bh % H, hk = h / group;
        scratch.resize(static_cast<size_t>(hi[b] - lo[b] + D));
        attend_any<T>(q.data + b * q.sb + h * q.sh, k.data + b * k.sb + hk * k.sh, v.data + b * v.sb + hk * v.sh, k.ss,
                      lo[b], hi[b], D, static_cast<T>(scale), scratch.data(), out_data + (b * H + h) * D);
    };
    // The pool's hand-off (a condition-variable wake) pays from a few MB of cache read. Measured on
    // 2 vCPUs, torch threads 2, 6x192 model decode steps (issue 21): at batch 8 (1.1 MB a layer) the
    // pool made the step slower (2.84-2.99 ms vs 2.70-2.74 on one thread), at batch 64 (8.7 MB)
    // faster (8.1-8.7 ms vs 9.5-10.4).
    int64_t keys = 0;
    for (int64_t b = 0; b < B; ++b) keys += hi[b] - lo[b];
    const int64_t bytes = 2 * keys * H * D * static_cast<int64_t>(sizeof(T));
    const int helpers = bytes >= (int64_t{1} << 22) ? static_cast<int>(std::min<int64_t>(threads, B * H)) - 1 : 0;
    {
        py::gil_scoped_release release;
        worker_pool::WorkerPool::instance().run(B * H, helpers, task);
    }
    return out_arr;
}

}  // namespace

PYBIND11_MODULE(_decode_attention, m) {
    m.doc() = "Attention for one query per row (decode steps) on the CPU; see csrc/decode_attention.cpp.";
    m.def("pool_workers", [] { return worker_pool::WorkerPool::instance().size(); }, "Worker threads started so far in this process.");
    m.def("decode_attention", &decode_attention<float>, py::arg("q"), py::arg("k"), py::arg("v"),
          py::arg("kv_start"), py::arg("kv_lens"), py::arg("scale"), py::arg("threads"), py::arg("new_k") = py::none(),
          py::arg("new_v") = py::none(), py::arg("at") = -1);
    m.def("decode_attention", &decode_attention<double>, py::arg("q"), py::arg("k"), py::arg("v"),
          py::arg("kv_start"), py::arg("kv_lens"), py::arg("scale"), py::arg("threads"), py::arg("new_k") = py::none(),
          py::arg("new_v") = py::none(), py::arg("at") = -1);
}
