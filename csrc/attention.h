// Attention of one query over a row of cached keys and values on the CPU: the kernel of a decode
// step's attention, shared by engine._decode_attention (one op) and engine._decode_step (a whole step).
//
// A decode step's attention reads every cached key and value once and does two multiply-adds per
// element read, so it is bound by memory. Each (row, query head) streams its keys once to get the
// scores, then its values once to sum them, with nothing but a score buffer in between: the two
// passes of a textbook softmax, not an online one, because a row's scores fit in L1/L2 and the
// exponentials can then run vectorised over all of them at once.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "simd.h"

namespace attention {


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

// q, k, v as the loops read them: a pointer and strides (in elements) per row and head; keys
// follow each other `seq` elements apart; the head dimension is contiguous.
template <class T>
struct Heads {
    const T* data;
    int64_t row, head, seq;
    const T* at(int64_t b, int64_t h) const { return data + b * row + h * head; }
};

// Every (row b, query head h) of a decode step: out[b, h] = attention of q(b, h) over keys
// [lo[b], hi[b]) of k, v at key head h / group (grouped-query attention). out: [B, H, D] contiguous.
// (row, head) pairs go to torch's OpenMP threads from 64 KB of cache read. Measured on 2 vCPUs,
// torch threads 2, 6x192 model decode steps, in-process A/B (issue 21): batch 1 (~135 KB a
// layer) 2.01 ms a step vs 2.09 on one thread (even), batch 8 (1.1 MB) 2.50 vs 2.78, batch 64
// (8.7 MB) 8.9 vs 9.6 with our own condition-variable pool (which lost to one thread at batch 8).
template <class T>
void attend_rows(const Heads<T>& q, const Heads<T>& k, const Heads<T>& v, int64_t B, int64_t H, int64_t group,
                 int64_t D, const int64_t* lo, const int64_t* hi, T scale, int threads, T* out) {
    auto task = [&](int64_t bh) {
        thread_local std::vector<T> scratch;
        const int64_t b = bh / H, h = bh % H;
        scratch.resize(static_cast<size_t>(hi[b] - lo[b] + D));
        attend_any<T>(q.at(b, h), k.at(b, h / group), v.at(b, h / group), k.seq, lo[b], hi[b], D, scale, scratch.data(),
                      out + bh * D);
    };
    int64_t keys = 0;
    for (int64_t b = 0; b < B; ++b) keys += hi[b] - lo[b];
    const int64_t bytes = 2 * keys * H * D * static_cast<int64_t>(sizeof(T));
    parallel::run(B * H, bytes >= (int64_t{1} << 16) ? threads : 1, task);
}

}  // namespace attention
