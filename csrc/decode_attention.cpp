// engine._decode_attention: attention for one query per row on the CPU (a decode step), what the
// torch backend uses instead of PyTorch's SDPA there (engine/backends.py says when).
//
// A decode step's attention reads every cached key and value once and does two multiply-adds per
// element read, so it is bound by memory: at batch 64 on the 6-layer/192-wide benchmark model it
// reads ~50 MB of float32 cache per step, which PyTorch's CPU flash kernel (SDPA) did at about
// 5 GB/s in the model, and this code at about 12. Here each (row, query head) streams its keys
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
// (row, head) pairs are spread over torch's OpenMP threads (parallel.h) when there is enough to read.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel.h"

namespace py = pybind11;

namespace {

// Vector-width clones picked at load time: the package is built for the baseline x86-64, the
// loops here want AVX2 / AVX-512 where the machine has them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

// A torch tensor as the kernel reads it: the pointer, sizes and strides (in elements), read
// through its Python methods with the C API (names interned once). Nothing is converted or copied:
// turning each tensor into a NumPy array cost four dispatched ops per tensor (30% of a batch-1
// step's ops), and pybind11's generic attribute calls and list casts about 2 us per tensor.
std::vector<int64_t> int_tuple(PyObject* tuple) {  // a torch.Size or a tuple of ints
    if (tuple == nullptr) throw py::error_already_set();
    if (!PyTuple_Check(tuple)) {
        Py_DECREF(tuple);
        throw std::invalid_argument("expected a tensor: its shape / stride() is not a tuple");
    }
    std::vector<int64_t> out(static_cast<size_t>(PyTuple_GET_SIZE(tuple)));
    for (size_t i = 0; i < out.size(); ++i) out[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(tuple, static_cast<Py_ssize_t>(i)));
    Py_DECREF(tuple);
    return out;
}

struct Tensor {
    char* data = nullptr;
    std::vector<int64_t> shape, strides;
    int64_t itemsize = 0;

    explicit Tensor(const py::handle& t) {
        static PyObject* const data_ptr_name = PyUnicode_InternFromString("data_ptr");
        static PyObject* const shape_name = PyUnicode_InternFromString("shape");
        static PyObject* const stride_name = PyUnicode_InternFromString("stride");
        static PyObject* const element_size_name = PyUnicode_InternFromString("element_size");
        const auto call = [&](PyObject* name) {
            PyObject* r = PyObject_CallMethodNoArgs(t.ptr(), name);
            if (r == nullptr) throw py::error_already_set();
            return py::reinterpret_steal<py::object>(r);
        };
        data = reinterpret_cast<char*>(PyLong_AsVoidPtr(call(data_ptr_name).ptr()));
        itemsize = PyLong_AsLongLong(call(element_size_name).ptr());
        shape = int_tuple(PyObject_GetAttr(t.ptr(), shape_name));
        strides = int_tuple(PyObject_CallMethodNoArgs(t.ptr(), stride_name));
        if (PyErr_Occurred()) throw py::error_already_set();
    }

    template <class T>  // the element at [i0, i1, i2, 0...] (indices past the tensor's dimensions ignored)
    T* at(int64_t i0, int64_t i1 = 0, int64_t i2 = 0) const {
        int64_t offset = i0 * strides[0];
        if (strides.size() > 1) offset += i1 * strides[1];
        if (strides.size() > 2) offset += i2 * strides[2];
        return reinterpret_cast<T*>(data) + offset;
    }
};

void check_4d(const Tensor& t, const char* name, int64_t B, int64_t H, int64_t S, int64_t D, int64_t itemsize) {
    const bool ok = t.shape.size() == 4 && t.shape[0] == B && t.shape[1] == H && t.shape[2] == S && t.shape[3] == D &&
                    t.strides[3] == 1 && t.itemsize == itemsize;
    if (!ok)
        throw std::invalid_argument(std::string(name) + " must be [B=" + std::to_string(B) + ", " + std::to_string(H) + ", " +
                                    std::to_string(S) + ", D=" + std::to_string(D) + "] of q's dtype, its last dimension contiguous");
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
        // fetch these keys' values now, so that the sum below finds them in cache: the key stream and
        // the value stream then overlap (6x192 model, batch 64, one thread: attention 6.2 -> 4.3 ms a step)
        for (int64_t j = 0; j < 4; ++j)
            for (int64_t d = 0; d < dim; d += 64 / static_cast<int64_t>(sizeof(T))) __builtin_prefetch(v + (s + j) * ss + d);
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
    const int64_t B = q.shape[0], H = q.shape[1], D = q.shape[3], group = H / k.shape[1];
    py::array_t<T> out({B, int64_t{1}, H, D});  // [B, 1, H, D]: heads side by side, as the next matmul reads them
    T* out_data = out.mutable_data();
    auto task = [&](int64_t bh) {
        thread_local std::vector<T> scratch;
        const int64_t b = bh / H, h = bh % H, hk = h / group;
        scratch.resize(static_cast<size_t>(hi[b] - lo[b] + D));
        attend_any<T>(q.at<T>(b, h), k.at<T>(b, hk), v.at<T>(b, hk), k.strides[2], lo[b], hi[b], D, static_cast<T>(scale),
                      scratch.data(), out_data + (b * H + h) * D);
    };
    // (row, head) pairs go to torch's OpenMP threads from 64 KB of cache read. Measured on 2 vCPUs,
    // torch threads 2, 6x192 model decode steps, in-process A/B (issue 21): batch 1 (~135 KB a
    // layer) 2.01 ms a step vs 2.09 on one thread (even), batch 8 (1.1 MB) 2.50 vs 2.78, batch 64
    // (8.7 MB) 8.9 vs 9.6 with our own condition-variable pool (which lost to one thread at batch 8).
    int64_t keys = 0;
    for (int64_t b = 0; b < B; ++b) keys += hi[b] - lo[b];
    const int64_t bytes = 2 * keys * H * D * static_cast<int64_t>(sizeof(T));
    {
        py::gil_scoped_release release;
        parallel::run(B * H, bytes >= (int64_t{1} << 16) ? threads : 1, task);
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
