// engine._decode_step: a whole decode step (one new token per row, KV cache appended) of a GPT-2
// or Llama-family model on the CPU in one call, what the torch backend runs instead of the model's
// modules there (engine/cpu_decode.py builds it and says when).
//
// Why: at batch 1 on the 6-layer/192-wide benchmark model a step's 25 matmuls take ~0.8 ms, and
// the ~100 small ops between them (norms, residual adds, GELU, views, the attention call), each
// dispatched from Python through PyTorch, ~1 ms more. Here the matmuls go to the BLAS inside
// torch's own CPU build (its sgemm_/dgemm_, whose addresses Python hands us) and everything between
// them is a loop over a few hundred numbers per row.
//
// One step, per row b (C = n_embd, I = the MLP's width; Llama's choices in brackets):
//   x = wte[token] + wpe[position]  [no wpe]                       [C]
//   per layer: h = LN1(x) [RMSNorm]; qkv = h Wqkvᵀ + b             [(nh + 2 nkv) hd]
//              [q, k: RMSNorm per head (Qwen3), then rotated to the position (RoPE)]
//              append k, v to the cache at column `at`; y = attention(q, cache[kv_start, at])
//              x += y Wprojᵀ + b; h = LN2(x); x += gelu(h Wfcᵀ + b) Wfc2ᵀ + b  [silu(gate) · up]
//   logits = LN_f(x) Wheadᵀ                                        [V]
// Same math as engine/model.py's GPT with the torch backend; sums run in another order (a
// residual add before or after the bias), so float32 logits agree to rounding, not bit for bit.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention.h"
#include "parallel.h"
#include "tensor_view.h"

namespace py = pybind11;
using tensor_view::Tensor;

namespace {

// Fortran BLAS ?gemm, column-major: C = alpha op(A) op(B) + beta C. Its integers are passed by
// pointer, as 32 bits (LP64 builds) or 64 (ILP64): we hand it 64-bit values below 2^31, which read
// the same either way on a little-endian machine (the low half comes first).
using BlasInt = int64_t;
template <class T>
using Gemm = void (*)(const char* transa, const char* transb, const BlasInt* m, const BlasInt* n, const BlasInt* k,
                      const T* alpha, const T* a, const BlasInt* lda, const T* b, const BlasInt* ldb, const T* beta, T* c,
                      const BlasInt* ldc);

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument(what); }

std::string shape_str(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

// A weight read in place: `t`, checked to be `dims` of element type T (any strides).
template <class T>
Tensor weight(const py::handle& t, const std::string& name, const std::vector<int64_t>& dims) {
    Tensor w(t);
    if (w.itemsize != static_cast<int64_t>(sizeof(T)) || w.shape != dims)
        fail(name + " must be " + shape_str(dims) + " of the model's dtype, got " + shape_str(w.shape) + " of " +
             std::to_string(w.itemsize) + "-byte elements");
    return w;
}

template <class T>
const T* optional_vector(const py::handle& t, const std::string& name, int64_t n) {  // a contiguous [n] or None
    if (t.is_none()) return nullptr;
    const Tensor v = weight<T>(t, name, {n});
    if (v.strides[0] != 1) fail(name + " must be contiguous");
    return v.at<T>(0);
}

// y [B, out] = x [B, in] · Wᵀ + bias, or y += that (accumulate); x and y contiguous. W [out, in]
// may have either layout: row-major, or the input-major one GPT.decode_layout gives.
template <class T>
struct Linear {
    const T* w = nullptr;
    const T* bias = nullptr;
    BlasInt out = 0, in = 0, lda = 0;
    char trans = 'N';

    Linear() = default;
    Linear(const py::handle& weight_obj, const py::handle& bias_obj, const std::string& name, int64_t out_, int64_t in_)
        : out(out_), in(in_) {
        const Tensor t = weight<T>(weight_obj, name + ".weight", {out_, in_});
        w = t.at<T>(0);
        // Read column-major, a row-major W is Wᵀ [in, out] (so op = transpose), an input-major one W [out, in].
        if (t.strides[1] == 1 && t.strides[0] >= in_) trans = 'T', lda = t.strides[0];
        else if (t.strides[0] == 1 && t.strides[1] >= out_) trans = 'N', lda = t.strides[1];
        else fail(name + ".weight must be row-major or input-major (one dimension contiguous), got strides " + shape_str(t.strides));
        if (std::max({out, in, lda}) > std::numeric_limits<int32_t>::max()) fail(name + ".weight is too large for BLAS's ints");
        bias = optional_vector<T>(bias_obj, name + ".bias", out_);
    }

    void operator()(Gemm<T> gemm, const T* x, int64_t rows, T* y, bool accumulate) const {
        if (bias != nullptr)
            for (int64_t b = 0; b < rows; ++b)
                for (int64_t o = 0; o < out; ++o) y[b * out + o] = (accumulate ? y[b * out + o] : T(0)) + bias[o];
        const T one = 1, beta = (accumulate || bias != nullptr) ? 1 : 0;
        gemm(&trans, "N", &out, &rows, &in, &one, w, &lda, x, &in, &beta, y, &out);
    }
};

// LayerNorm over rows of n: y = (x - mean) / sqrt(var + eps) · weight + bias; or RMSNorm (rms):
// y = x / sqrt(mean(x²) + eps) · weight. Statistics in double.
template <class T>
struct Norm {
    const T* weight = nullptr;
    const T* bias = nullptr;
    double eps = 0;
    bool rms = false;

    Norm() = default;
    Norm(const py::handle& w, const py::handle& b, const std::string& name, int64_t n, double eps_, bool rms_)
        : weight(optional_vector<T>(w, name + ".weight", n)), bias(optional_vector<T>(b, name + ".bias", n)), eps(eps_),
          rms(rms_) {
        if (weight == nullptr) fail(name + ".weight is missing");
    }

    void operator()(const T* x, int64_t rows, int64_t n, T* y) const {
        for (int64_t b = 0; b < rows; ++b, x += n, y += n) {
            double mean = 0, squares = 0;
            if (!rms) {
                for (int64_t i = 0; i < n; ++i) mean += x[i];
                mean /= n;
            }
            for (int64_t i = 0; i < n; ++i) squares += (x[i] - mean) * (x[i] - mean);
            const T m = static_cast<T>(mean), rstd = static_cast<T>(1 / std::sqrt(squares / n + eps));
            for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - m) * rstd * weight[i] + (bias ? bias[i] : T(0));
        }
    }
};

// GELU, tanh form, in place: 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)), u = sqrt(2/pi) (x + 0.044715 x³)
// (one exp, which vectorises with libmvec, instead of a tanh, which is slow in PyTorch's CPU build too).
// The exponent is capped at 80: under -ffast-math the vector exp's overflow to inf became NaN by
// x <= -30 (GELU there is -0; the cap gives |x| / 5.5e34).
template <class T>
VECTOR_CLONES void gelu_tanh(T* x, int64_t n) {
    const T c = static_cast<T>(2 * 0.7978845608028654);  // 2 sqrt(2/pi)
#pragma omp simd
    for (int64_t i = 0; i < n; ++i)
        x[i] = x[i] / (T(1) + std::exp(std::min(-c * (x[i] + T(0.044715) * x[i] * x[i] * x[i]), T(80))));
}

// SwiGLU over rows of [gate (I) | up (I)] -> out rows of silu(gate) · up (I), with
// silu(g) = g / (1 + exp(-g)) (the exponent capped as in gelu_tanh).
template <class T>
VECTOR_CLONES void swiglu_rows(const T* x, int64_t rows, int64_t I, T* out) {
    for (int64_t b = 0; b < rows; ++b, x += 2 * I, out += I) {
        const T* up = x + I;
#pragma omp simd
        for (int64_t i = 0; i < I; ++i) out[i] = x[i] / (T(1) + std::exp(std::min(-x[i], T(80)))) * up[i];
    }
}

// RoPE in place on one head x [hd]: each pair (x[i], x[i + hd/2]) rotated by the position's angle.
template <class T>
void rotate(T* x, const T* cos, const T* sin, int64_t half) {
    for (int64_t i = 0; i < half; ++i) {
        const T a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i] + a * sin[i];
    }
}

template <class T>
struct Layer {
    Norm<T> ln_1, ln_2, q_norm, k_norm;  // (q_norm, k_norm: Qwen3's, per head; weight null when absent)
    Linear<T> qkv, proj, fc, fc2;
};

template <class T>
class Step {
   public:
    Step(const py::dict& w, const py::list& layers, const py::dict& shape, const py::handle& k_cache,
         const py::handle& v_cache, const py::handle& kv_start, uintptr_t gemm_address)
        : gemm_(reinterpret_cast<Gemm<T>>(gemm_address)) {
        C_ = shape["n_embd"].cast<int64_t>(), nh_ = shape["n_head"].cast<int64_t>(), nkv_ = shape["n_kv_head"].cast<int64_t>();
        hd_ = shape["head_dim"].cast<int64_t>(), I_ = shape["intermediate_size"].cast<int64_t>();
        V_ = shape["vocab_size"].cast<int64_t>(), P_ = shape["block_size"].cast<int64_t>();
        const double eps = shape["eps"].cast<double>();
        const bool rms = shape["rms_norm"].cast<bool>(), qk_norm = shape["qk_norm"].cast<bool>();
        swiglu_ = shape["swiglu"].cast<bool>(), rotary_ = shape["rotary"].cast<bool>();
        if (gemm_ == nullptr) fail("no BLAS gemm given");
        if (C_ < 1 || nh_ < 1 || nkv_ < 1 || nh_ % nkv_ != 0 || hd_ < 1 || I_ < 1 || V_ < 1 || P_ < 1)
            fail("bad model shape: n_embd, n_head, n_kv_head (dividing n_head), head_dim, intermediate_size, "
                 "vocab_size, block_size must be positive");
        const int64_t nqkv = (nh_ + 2 * nkv_) * hd_;
        wte_ = weight<T>(w["wte"], "wte", {V_, C_});
        if (rotary_) {  // the angles' cos and sin, [block_size, hd / 2] flattened
            if (hd_ % 2) fail("head_dim must be even for rotary positions");
            cos_ = optional_vector<T>(w["rope_cos"], "rope_cos", P_ * hd_ / 2);
            sin_ = optional_vector<T>(w["rope_sin"], "rope_sin", P_ * hd_ / 2);
            if (cos_ == nullptr || sin_ == nullptr) fail("rope_cos and rope_sin are missing");
        } else {
            wpe_ = weight<T>(w["wpe"], "wpe", {P_, C_});
        }
        for (size_t i = 0; i < layers.size(); ++i) {
            const py::dict l = layers[i];
            const std::string at = "h." + std::to_string(i) + ".";
            layers_.push_back(Layer<T>{
                Norm<T>(l["ln_1.weight"], l["ln_1.bias"], at + "ln_1", C_, eps, rms),
                Norm<T>(l["ln_2.weight"], l["ln_2.bias"], at + "ln_2", C_, eps, rms),
                qk_norm ? Norm<T>(l["attn.q_norm.weight"], py::none(), at + "attn.q_norm", hd_, eps, true) : Norm<T>(),
                qk_norm ? Norm<T>(l["attn.k_norm.weight"], py::none(), at + "attn.k_norm", hd_, eps, true) : Norm<T>(),
                Linear<T>(l["attn.c_attn.weight"], l["attn.c_attn.bias"], at + "attn.c_attn", nqkv, C_),
                Linear<T>(l["attn.c_proj.weight"], l["attn.c_proj.bias"], at + "attn.c_proj", C_, nh_ * hd_),
                Linear<T>(l["mlp.c_fc.weight"], l["mlp.c_fc.bias"], at + "mlp.c_fc", (swiglu_ ? 2 : 1) * I_, C_),
                Linear<T>(l["mlp.c_proj.weight"], l["mlp.c_proj.bias"], at + "mlp.c_proj", C_, I_),
            });
        }
        ln_f_ = Norm<T>(w["ln_f.weight"], w["ln_f.bias"], "ln_f", C_, eps, rms);
        head_ = Linear<T>(w["lm_head.weight"], py::none(), "lm_head", V_, C_);
        // the cache: [n_layer, B, nkv, S, hd], the head dimension contiguous
        k_ = Tensor(k_cache), v_ = Tensor(v_cache);
        const int64_t L = static_cast<int64_t>(layers_.size());
        B_ = k_.shape.size() == 5 ? k_.shape[1] : 0, S_ = k_.shape.size() == 5 ? k_.shape[3] : 0;
        for (const Tensor* t : {&k_, &v_})
            if (t->shape != std::vector<int64_t>{L, B_, nkv_, S_, hd_} || t->strides[4] != 1 || B_ < 1 ||
                t->itemsize != static_cast<int64_t>(sizeof(T)))
                fail("k_cache and v_cache must be [n_layer=" + std::to_string(L) + ", B, n_kv_head=" + std::to_string(nkv_) +
                     ", S, head_dim=" + std::to_string(hd_) + "] of the model's dtype, the last dimension contiguous, got " +
                     shape_str(t->shape) + " and " + shape_str(v_.shape));
        kv_start_.assign(B_, 0);
        if (!kv_start.is_none()) {
            const Tensor s(kv_start);
            if (s.shape != std::vector<int64_t>{B_} || s.itemsize != 8) fail("kv_start must be an int64 tensor [B=" + std::to_string(B_) + "]");
            for (int64_t b = 0; b < B_; ++b) {
                kv_start_[b] = *s.at<int64_t>(b);
                if (kv_start_[b] < 0 || kv_start_[b] >= S_)
                    fail("kv_start[" + std::to_string(b) + "]=" + std::to_string(kv_start_[b]) + " is not a column of the cache [0, S=" + std::to_string(S_) + ")");
            }
        }
        keep_ = py::make_tuple(w, layers, k_cache, v_cache);  // the memory read above stays alive
        x_.resize(B_ * C_), h_.resize(B_ * C_), qkv_.resize(B_ * nqkv), y_.resize(B_ * nh_ * hd_);
        fc_.resize(B_ * (swiglu_ ? 2 : 1) * I_), act_.resize(swiglu_ ? B_ * I_ : 0);
        hi_.resize(B_);
        logits_ = py::array_t<T>({B_, V_});
    }

    // tokens: int64 [B] or [B, 1]; at: the cache column they go to -> logits [B, V], the same array
    // every step, overwritten by the next (a new one cost a small step a few us: the allocation, and
    // NumPy's buffer description made anew when the sampler reads it). One call at a time: the
    // buffers are the Step's.
    py::array_t<T> operator()(const py::handle& tokens_obj, int64_t at, int threads) {
        const Tensor tokens(tokens_obj);
        if (tokens.itemsize != 8 || tokens.shape.empty() || tokens.shape[0] != B_ || (tokens.shape.size() == 2 && tokens.shape[1] != 1) ||
            tokens.shape.size() > 2)
            fail("tokens must be int64 [B=" + std::to_string(B_) + "] or [B, 1], got " + shape_str(tokens.shape));
        if (at < 0 || at >= S_ || at >= P_) fail("at=" + std::to_string(at) + " is past the cache (S=" + std::to_string(S_) + ") or the context");
        for (int64_t b = 0; b < B_; ++b) {
            const int64_t t = *tokens.at<int64_t>(b);
            if (t < 0 || t >= V_) fail("token " + std::to_string(t) + " in row " + std::to_string(b) + " is not in [0, vocab_size=" + std::to_string(V_) + ")");
            if (kv_start_[b] > at) fail("row " + std::to_string(b) + " starts at kv_start=" + std::to_string(kv_start_[b]) + " > at=" + std::to_string(at));
        }
        T* out = logits_.mutable_data();
        {
            py::gil_scoped_release release;
            std::fill(hi_.begin(), hi_.end(), at + 1);  // every row attends up to this step's column
            embed(tokens, at);
            for (size_t l = 0; l < layers_.size(); ++l) layer(l, at, threads);
            ln_f_(x_.data(), B_, C_, h_.data());
            head_(gemm_, h_.data(), B_, out, false);
        }
        return logits_;
    }

   private:
    void embed(const Tensor& tokens, int64_t at) {
        for (int64_t b = 0; b < B_; ++b) {
            const T* tok = wte_.at<T>(*tokens.at<int64_t>(b));
            for (int64_t c = 0; c < C_; ++c) x_[b * C_ + c] = tok[c * wte_.strides[1]];
            if (rotary_) continue;  // (the positions rotate q and k instead)
            const T* pos = wpe_.at<T>(position(b, at));
            for (int64_t c = 0; c < C_; ++c) x_[b * C_ + c] += pos[c * wpe_.strides[1]];
        }
    }

    int64_t position(int64_t b, int64_t at) const { return at - kv_start_[b]; }  // from each row's first real token

    void layer(size_t l, int64_t at, int threads) {
        const Layer<T>& w = layers_[l];
        const int64_t nqkv = (nh_ + 2 * nkv_) * hd_;
        w.ln_1(x_.data(), B_, C_, h_.data());
        w.qkv(gemm_, h_.data(), B_, qkv_.data(), false);
        if (w.q_norm.weight != nullptr)  // per head, over hd: q's heads, then k's
            for (int64_t b = 0; b < B_; ++b) {
                T* q = qkv_.data() + b * nqkv;
                w.q_norm(q, nh_, hd_, q);
                w.k_norm(q + nh_ * hd_, nkv_, hd_, q + nh_ * hd_);
            }
        if (rotary_)  // q's and k's heads, side by side in the row
            for (int64_t b = 0; b < B_; ++b) {
                const int64_t half = hd_ / 2, pos = position(b, at);
                for (int64_t h = 0; h < nh_ + nkv_; ++h)
                    rotate(qkv_.data() + b * nqkv + h * hd_, cos_ + pos * half, sin_ + pos * half, half);
            }
        // this step's keys and values into column `at` of the layer's cache
        T* const k = reinterpret_cast<T*>(k_.data) + l * k_.strides[0];
        T* const v = reinterpret_cast<T*>(v_.data) + l * v_.strides[0];
        for (int64_t b = 0; b < B_; ++b)
            for (int64_t j = 0; j < nkv_; ++j) {
                const T* row = qkv_.data() + b * nqkv + (nh_ + j) * hd_;
                const int64_t column = b * k_.strides[1] + j * k_.strides[2] + at * k_.strides[3];
                std::copy_n(row, hd_, k + column);
                std::copy_n(row + nkv_ * hd_, hd_, v + b * v_.strides[1] + j * v_.strides[2] + at * v_.strides[3]);
            }
        attention::attend_rows<T>({qkv_.data(), nqkv, hd_, 0}, {k, k_.strides[1], k_.strides[2], k_.strides[3]},
                                  {v, v_.strides[1], v_.strides[2], v_.strides[3]}, B_, nh_, nh_ / nkv_, hd_,
                                  kv_start_.data(), hi_.data(), static_cast<T>(1 / std::sqrt(static_cast<double>(hd_))),
                                  threads, y_.data());
        w.proj(gemm_, y_.data(), B_, x_.data(), true);
        w.ln_2(x_.data(), B_, C_, h_.data());
        w.fc(gemm_, h_.data(), B_, fc_.data(), false);
        if (swiglu_) {
            swiglu_rows(fc_.data(), B_, I_, act_.data());
            w.fc2(gemm_, act_.data(), B_, x_.data(), true);
        } else {
            gelu_tanh(fc_.data(), B_ * I_);
            w.fc2(gemm_, fc_.data(), B_, x_.data(), true);
        }
    }

    Gemm<T> gemm_;
    int64_t C_ = 0, nh_ = 0, nkv_ = 0, hd_ = 0, I_ = 0, V_ = 0, P_ = 0, B_ = 0, S_ = 0;
    bool swiglu_ = false, rotary_ = false;  // Llama's MLP and positions
    Tensor wte_, wpe_, k_, v_;
    const T* cos_ = nullptr;  // rotary: [block_size, hd / 2] each
    const T* sin_ = nullptr;
    std::vector<Layer<T>> layers_;
    Norm<T> ln_f_;
    Linear<T> head_;
    std::vector<int64_t> kv_start_, hi_;
    std::vector<T> x_, h_, qkv_, y_, fc_, act_;  // the residual stream, a normed copy, q|k|v, attention out,
                                                 // MLP hidden (SwiGLU: gate|up, and the product)
    py::array_t<T> logits_;
    py::object keep_;
};

template <class T>
void register_step(py::module_& m, const char* name) {
    py::class_<Step<T>>(m, name)
        .def(py::init<const py::dict&, const py::list&, const py::dict&, const py::handle&, const py::handle&,
                      const py::handle&, uintptr_t>(),
             py::arg("weights"), py::arg("layers"), py::arg("shape"), py::arg("k_cache"), py::arg("v_cache"),
             py::arg("kv_start"), py::arg("gemm"))
        .def("__call__", &Step<T>::operator(), py::arg("tokens"), py::arg("at"), py::arg("threads"));
}

}  // namespace

PYBIND11_MODULE(_decode_step, m) {
    m.doc() = "A whole GPT-2 / Llama-family decode step on the CPU in one call; see csrc/decode_step.cpp.";
    m.def("pool_calls", [] { return parallel::calls.load(); }, "Calls handed to torch's OpenMP threads so far.");
    register_step<float>(m, "StepFloat32");  // the BLAS's sgemm_
    register_step<double>(m, "StepFloat64");  // dgemm_
}
