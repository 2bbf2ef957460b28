// engine._sampler: the C++ token sampler. Same documented order and the same arithmetic as the
// reference in engine/sampling.py (read its module docstring first), so both pick identical tokens:
//
//   penalties -> logit bias -> temperature -> top-k -> top-p -> min-p -> Gumbel-max draw
//
// Work per row is O(V) plus O(k log k): top-k by a bound from block maxima (no sort of the vocabulary),
// top-p on the ranked top-k survivors (or, without top-k, on a ranking grown chunk by chunk with
// nth_element until the mass is reached), min-p in one linear pass, the draw without a cumulative
// sum. A greedy row without penalties, bias or log-probs is one argmax pass over the float32 row
// and nothing else; penalties, stop strings and log-probs cost nothing for rows that don't ask.
// Rows run with the GIL released, on the calling thread or, when a batch is big enough to pay
// for the hand-off, also on torch's OpenMP threads (parallel.h). DecodeLoop keeps each sequence's token
// counts and stop-string tail, and writes its results into buffers it owns: a step allocates nothing.
//
// Built with -ffp-contract=off: a fused multiply-add would change roundings the reference makes.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "parallel.h"
#include "simd.h"

namespace py = pybind11;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ULL;  // splitmix64's increment
// Every Gumbel sample is below -log(-log(1 - 2^-54)) < 38: a token whose tempered logit is 38
// below the best key so far cannot win, so its noise is never computed.
constexpr double kGumbelMax = 38.0;

// Bad arguments (shapes, token ids): raised in Python as engine.errors.InputError, like the
// Python-side checks. Bad logits (NaN, all -inf) stay std::invalid_argument -> ValueError.
struct InputError : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};

struct Params {
    double temperature, top_p, min_p, repetition, presence, frequency;
    int64_t top_k, max_new_tokens;
    std::vector<std::pair<int64_t, double>> bias;
    bool logprobs;
    std::vector<int64_t> stop_ids;
    std::vector<std::string> stop;  // UTF-8 bytes

    bool penalized() const { return repetition != 1 || presence != 0 || frequency != 0; }
    // Greedy with nothing to apply first and nothing to report: the argmax of the raw row.
    bool argmax_only() const { return temperature == 0 && !penalized() && bias.empty() && !logprobs; }
};

using Counts = std::vector<std::pair<int64_t, int64_t>>;  // distinct (token id, occurrences)

struct Draw {
    int64_t token = -1;
    double logprob = kNaN;
};

// ------------------------------------------------------------------------------------- the RNG

inline uint64_t mix64(uint64_t z) {  // splitmix64's finaliser
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

inline uint64_t stream_key(uint64_t seed, uint64_t position) { return mix64(mix64(seed + kGamma) ^ position); }

inline double uniform(uint64_t key, int64_t token) {
    const uint64_t h = mix64(key + static_cast<uint64_t>(token + 1) * kGamma);
    return (static_cast<double>(h >> 11) + 0.5) * 0x1p-53;  // 53 bits, inside (0, 1)
}

// A token trailing the best key by more than m wins only if its Gumbel noise -log(-log u) > m,
// i.e. u > exp(-exp(-m)). Testing u first (a hash) skips the two logarithms for most of a
// vocabulary. The thresholds are lowered by 1e-9 relative so that rounding can never make a
// skipped token the winner: the result is exactly that of computing every key.
struct SkipLevel {
    double margin, u_min;
};
const SkipLevel kSkipLevels[] = {{16, std::exp(-std::exp(-16.0)) * (1 - 1e-9)}, {8, std::exp(-std::exp(-8.0)) * (1 - 1e-9)},
                                 {4, std::exp(-std::exp(-4.0)) * (1 - 1e-9)}, {2, std::exp(-std::exp(-2.0)) * (1 - 1e-9)}};

// ------------------------------------------------------------------------------------- one row

struct Scratch {  // per-worker buffers, reused across calls
    std::vector<double> x, w;
    std::vector<int32_t> idx;
    std::vector<int32_t> tally;  // all zero between uses: counts tokens without a hash map
    Counts counts;
};

// Counts of a token list (ids already checked to be in [0, V)).
const Counts& count_tokens(const std::vector<int64_t>& tokens, int64_t V, Scratch& s) {
    s.tally.resize(V);
    s.counts.clear();
    for (int64_t tok : tokens)
        if (s.tally[tok]++ == 0) s.counts.emplace_back(tok, 0);
    for (auto& [tok, n] : s.counts) n = s.tally[tok], s.tally[tok] = 0;
    return s.counts;
}

std::string row_error(int64_t b, const char* what) { return "logits row " + std::to_string(b) + " " + what; }

// Whether row[0..V) holds NaN or +inf: one comparison per value (an int so that the loop vectorises).
__attribute__((noinline)) VECTOR_CLONES bool has_nan_or_inf(const float* row, int64_t V) {
    int bad = 0;
#pragma omp simd reduction(| : bad)
    for (int64_t i = 0; i < V; ++i) bad |= !(row[i] < std::numeric_limits<float>::infinity());
    return bad;
}

// Throws on NaN and +inf logits (checked on the input row, as the reference does).
void check_row(const float* row, int64_t V, int64_t b) {
    if (has_nan_or_inf(row, V)) {
        const bool nan = std::any_of(row, row + V, [](float v) { return v != v; });
        throw std::invalid_argument(row_error(b, nan ? "contains NaN" : "contains +inf"));
    }
}

// The maximum of x[0..n) (no NaN in x; -inf when n = 0). (noinline, here and below: the clones
// are what vectorises; inlined into sample_row these loops went scalar, ~1 us per 2,048 values)
template <class T>
__attribute__((noinline)) VECTOR_CLONES T max_of(const T* x, int64_t n) {
    T best = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : best)
    for (int64_t i = 0; i < n; ++i) best = x[i] > best ? x[i] : best;
    return best;
}

// Index of the first maximum of x[0..V) (no NaN in x): ties go to the lowest id. After the
// maximum, the search compares a block of values at a time, then steps into the block holding it.
template <class T>
__attribute__((noinline)) VECTOR_CLONES int64_t first_max(const T* x, int64_t V) {
    const T best = max_of(x, V);
    constexpr int kBlock = 16;
    int64_t i = 0;
    for (; i + kBlock <= V; i += kBlock) {
        int hit = 0;
#pragma omp simd reduction(| : hit)
        for (int j = 0; j < kBlock; ++j) hit |= x[i + j] == best;
        if (hit) break;
    }
    while (i < V && x[i] != best) ++i;
    return i;
}

// x = the row widened to float64, then penalties and bias. Throws on NaN, +inf.
void process(const float* row, int64_t V, const Params& p, const Counts& counts, int64_t b, std::vector<double>& x) {
    check_row(row, V, b);
    x.assign(row, row + V);
    if (p.penalized()) {
        for (const auto& [tok, n] : counts) {
            double v = x[tok];
            v = v > 0 ? v / p.repetition : v * p.repetition;
            x[tok] = v - (p.presence + p.frequency * static_cast<double>(n));
        }
    }
    for (const auto& [tok, add] : p.bias) x[tok] += add;
}

// Writes the ids i < V with keep(i), ascending, to idx[0..n) and returns n. idx keeps at least V
// entries (grown, never shrunk: zeroed once per thread, not once per row). Branch-free, the row's
// pointer in a register: push_back in an if reloaded it at every id (the vector might alias it)
// and was 45% of a sampled row's time at V = 2048, the sampler's hottest loop.
template <class Keep>
int64_t select_ids(int64_t V, std::vector<int32_t>& idx, Keep keep) {
    if (idx.size() < static_cast<size_t>(V)) idx.resize(static_cast<size_t>(V));
    int32_t* out = idx.data();
    int64_t n = 0;
    for (int64_t i = 0; i < V; ++i) {
        out[n] = static_cast<int32_t>(i);
        n += keep(i);
    }
    return n;
}

// Top-k (k < V): idx[0..k) = the ids of the k best tokens (x descending, id ascending), ranked. k disjoint blocks
// of the row hold k maxima, so the k-th best value is at least the smallest of them: only tokens
// reaching that bar (a few k of them in a typical row) are ranked. Tokens equal to the bar stay
// in, so ties are settled by id as everywhere else.
void top_k(const std::vector<double>& x, int64_t k, std::vector<int32_t>& idx) {
    const auto better = [&x](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); };
    const int64_t V = static_cast<int64_t>(x.size()), block = V / k;
    double bar = kInf;
    for (int64_t j = 0; j < k; ++j) bar = std::min(bar, max_of(x.data() + j * block, block));
    const double* xs = x.data();
    const int64_t n = select_ids(V, idx, [xs, bar](int64_t i) { return xs[i] >= bar; });
    std::nth_element(idx.begin(), idx.begin() + (k - 1), idx.begin() + n, better);
    std::sort(idx.begin(), idx.begin() + k, better);
}

// Without top-k: rank just enough of the vocabulary (chunks of growing size, nth_element + sort)
// to find the shortest prefix whose weight reaches top_p * total. Returns its length.
int64_t top_p_prefix(const std::vector<double>& x, const std::vector<double>& w, double top_p, std::vector<int32_t>& idx) {
    const auto better = [&x](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); };
    const int64_t V = static_cast<int64_t>(x.size());
    double total = 0;
    for (int64_t i = 0; i < V; ++i) total += w[i];
    const double threshold = top_p * total;
    // Tokens lighter than tau weigh at most V * tau = (1 - top_p) * total / 2 together, less than
    // the mass the prefix leaves out, and they rank below all others: the prefix ends before them.
    const double tau = top_p < 1 - 1e-6 ? 0.5 * (1 - top_p) * total / static_cast<double>(V) : 0.0;
    const double* ws = w.data();
    const int64_t n = select_ids(V, idx, [ws, tau](int64_t i) { return ws[i] >= tau; });
    double cum = 0;
    for (int64_t done = 0, chunk = 64; done < n; done += chunk, chunk *= 4) {
        const int64_t end = std::min(n, done + chunk);
        if (end < n) std::nth_element(idx.begin() + done, idx.begin() + end, idx.begin() + n, better);
        std::sort(idx.begin() + done, idx.begin() + end, better);
        for (int64_t j = done; j < end; ++j) {
            cum += w[idx[j]];
            if (cum >= threshold) return j + 1;
        }
    }
    return n;
}

// With top-k and/or top-p: s.idx[0..n) = the ranked survivors (after min-p too). Returns n.
int64_t ranked_survivors(const std::vector<double>& x, double xmax, int64_t k, const Params& p, Scratch& s) {
    const double t = p.temperature;
    const int64_t V = static_cast<int64_t>(x.size());
    auto& w = s.w;
    int64_t n;
    if (k < V) {  // s.idx already holds the ranked top-k
        w.resize(k);
        for (int64_t j = 0; j < k; ++j) w[j] = std::exp((x[s.idx[j]] - xmax) / t);
        n = k;
        if (p.top_p < 1) {
            double total = 0;
            for (int64_t j = 0; j < k; ++j) total += w[j];
            const double threshold = p.top_p * total;
            double cum = 0;
            for (n = 0; n < k && cum < threshold;) cum += w[n++];
        }
        return p.min_p > 0 ? std::count_if(w.begin(), w.begin() + n, [&](double v) { return v >= p.min_p; }) : n;
    }
    w.resize(V);
    for (int64_t i = 0; i < V; ++i) w[i] = std::exp((x[i] - xmax) / t);
    n = top_p_prefix(x, w, p.top_p, s.idx);
    return p.min_p > 0 ? std::count_if(s.idx.begin(), s.idx.begin() + n, [&](int32_t i) { return w[i] >= p.min_p; }) : n;
}

const char* const kAllMasked = "is -inf everywhere (after logit bias): nothing can be sampled";

// The documented chain for one row. counts: prompt + generated token counts (used only when the
// row has penalties).
Draw sample_row(const float* row, int64_t V, const Params& p, const Counts& counts, int64_t position, uint64_t seed, int64_t b,
                Scratch& s) {
    if (p.argmax_only()) {  // widening to float64 is exact and keeps the order: the raw row's argmax
        check_row(row, V, b);
        const int64_t token = first_max(row, V);
        if (row[token] == -std::numeric_limits<float>::infinity()) throw std::invalid_argument(row_error(b, kAllMasked));
        return Draw{token, kNaN};
    }
    auto& x = s.x;
    process(row, V, p, counts, b, x);
    const int64_t k = p.temperature > 0 && p.top_k > 0 && p.top_k < V ? p.top_k : V;
    int64_t argmax = 0;
    if (k < V) {
        top_k(x, k, s.idx);  // ranked: its first token is the maximum
        argmax = s.idx[0];
    } else {
        argmax = first_max(x.data(), V);
    }
    const double xmax = x[argmax];
    if (xmax == -kInf) throw std::invalid_argument(row_error(b, kAllMasked));

    const double t = p.temperature;
    Draw out;
    if (t == 0) {
        out.token = argmax;
    } else {
        const uint64_t key = stream_key(seed, static_cast<uint64_t>(position));
        double best = -kInf;
        const auto consider = [&](int64_t i, double z) {  // Gumbel-max, ties to the lowest id
            const double gap = best - z;
            if (gap > kGumbelMax) return;
            const double u = uniform(key, i);
            for (const auto& level : kSkipLevels)
                if (gap > level.margin) {
                    if (u < level.u_min) return;
                    break;
                }
            const double score = z - std::log(-std::log(u));
            if (score > best || (score == best && i < out.token)) best = score, out.token = i;
        };
        if (k < V || p.top_p < 1) {
            const int64_t n = ranked_survivors(x, xmax, k, p, s);
            for (int64_t j = 0; j < n; ++j) consider(s.idx[j], (x[s.idx[j]] - xmax) / t);
        } else {  // the whole vocabulary, min-p in the same pass; start from the top token
            // exp(z) >= min_p is certainly false below log(min_p) - 1e-6: no exp needed there
            const double z_min = p.min_p > 0 ? std::log(p.min_p) - 1e-6 : -kInf;
            consider(argmax, 0.0);
            for (int64_t i = 0; i < V; ++i) {
                const double z = (x[i] - xmax) / t;
                if (z < z_min || (p.min_p > 0 && !(std::exp(z) >= p.min_p))) continue;
                consider(i, z);
            }
        }
    }
    if (p.logprobs) {
        const double scale = t > 0 ? t : 1.0;
        double sum = 0;
        for (int64_t i = 0; i < V; ++i) sum += std::exp((x[i] - xmax) / scale);
        out.logprob = (x[out.token] - xmax) / scale - std::log(sum);
    }
    return out;
}

// ------------------------------------------------------------------------------------- batches

// Per-thread buffers (the calling thread's and each worker's), reused across calls. (noinline: inlined,
// the compiler recomputed the thread-local address, a __tls_get_addr call, at every use in the
// sampled rows' loops: 12% of a sampled step.)
__attribute__((noinline)) Scratch& thread_scratch() {
    static thread_local Scratch scratch;
    return scratch;
}

// Below this much work (in logits read, an argmax-only row counting its V, any other row
// kSampledRowWeight x V, about 0.5 ns a unit on one core) a step runs on the calling thread
// alone. `python benchmarks/sampling.py --pool` measured it on 2 vCPUs with torch's OpenMP
// threads (three runs, the last in benchmarks/results/x86-64-2026-11-30-pool): 1.05-1.11x at
// 2^14 units (greedy, V 2048, batch 8), 1.15-1.5x at 2^15 (greedy, V 4096, batch 8), 1.35-1.98x
// above. (A batch of one row is one task: it always runs alone.) Our own condition-variable pool
// had needed 2^25. Tests and that benchmark move it with set_pool_min_work.
constexpr int64_t kSampledRowWeight = 8;
std::atomic<int64_t> pool_min_work{int64_t{1} << 15};

// Samples rows[0..n) with row_fn(b, scratch) -> Draw into out[b], GIL released; threads counts
// the caller. A row's error (NaN, all -inf) is rethrown for the lowest such row, as ValueError,
// once all rows are done; errors[b] must be empty on entry and is left empty.
template <class RowFn>
void sample_rows(const std::vector<int64_t>& rows, int threads, int64_t work, RowFn row_fn, std::vector<Draw>& out,
                 std::vector<std::string>& errors) {
    std::atomic<bool> failed{false};
    auto task = [&](int64_t i) {
        const int64_t b = rows[i];
        try {
            out[b] = row_fn(b, thread_scratch());
        } catch (const std::exception& e) {
            errors[b] = e.what();
            failed = true;
        }
    };
    const int64_t n = static_cast<int64_t>(rows.size());
    if (work >= pool_min_work) {
        py::gil_scoped_release release;
        parallel::run(n, threads, task);
    } else {  // (releasing and taking back the GIL would cost more than a small step's work)
        parallel::run(n, 1, task);
    }
    if (!failed) return;
    for (auto& e : errors)
        if (!e.empty()) {
            const std::string first = std::move(e);
            for (auto& rest : errors) rest.clear();
            throw std::invalid_argument(first);
        }
}

int64_t row_work(const Params& p, int64_t V) { return p.argmax_only() ? V : kSampledRowWeight * V; }

// Logits as the samplers read them: a C-contiguous, aligned, native float32 [B, V] NumPy array,
// read in place from the array's own fields (pybind11's view of NumPy's structs), with nothing
// allocated. (pybind11's array_t conversion went through NumPy's PyArray_FromAny, ~3 us a call in
// a cold cache; the buffer protocol builds and frees a format string every call, ~1 us.)
class Logits {
  public:
    Logits(const py::handle& logits, int64_t batch) {
        using api = py::detail::npy_api;
        constexpr int layout = api::NPY_ARRAY_C_CONTIGUOUS_ | api::NPY_ARRAY_ALIGNED_;
        constexpr char swapped = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ ? '>' : '<';  // NumPy writes native as '='
        if (!api::get().PyArray_Check_(logits.ptr())) throw InputError(expected(batch));
        const auto* array = py::detail::array_proxy(logits.ptr());
        const auto* dtype = py::detail::array_descriptor_proxy(array->descr);
        if (dtype->type_num != api::NPY_FLOAT_ || dtype->byteorder == swapped || (array->flags & layout) != layout ||
            array->nd != 2 || array->dimensions[0] != batch || array->dimensions[1] < 1)
            throw InputError(expected(batch));
        if (array->dimensions[1] > std::numeric_limits<int32_t>::max()) throw InputError("vocabulary larger than 2^31");
        data_ = reinterpret_cast<const float*>(array->data);
        vocab_ = array->dimensions[1];
    }

    const float* data() const { return data_; }
    int64_t vocab() const { return vocab_; }

  private:
    static std::string expected(int64_t batch) {
        return "logits must be a C-contiguous float32 [B=" + std::to_string(batch) + ", V>=1] NumPy array";
    }
    const float* data_;
    int64_t vocab_;
};

void check_ids(const Params& p, const std::vector<int64_t>& tokens, int64_t V, size_t b) {
    const auto bad = [&](int64_t tok, const char* what) {
        return InputError(std::string(what) + " of row " + std::to_string(b) + " holds token id " + std::to_string(tok) +
                                     ", not an id in [0, V=" + std::to_string(V) + ")");
    };
    for (const auto& [tok, add] : p.bias)
        if (tok < 0 || tok >= V) throw bad(tok, "logit_bias");
    for (int64_t tok : tokens)
        if (tok < 0 || tok >= V) throw bad(tok, "the previous tokens");
}

// Stateless: penalties counted from prev_tokens at every call. Returns (tokens, logprobs).
py::tuple sample(const py::handle& logits_obj, const std::vector<Params>& params, const std::vector<std::vector<int64_t>>& prev_tokens,
                 const std::vector<int64_t>& positions, const std::vector<uint64_t>& seeds, int threads) {
    const int64_t B = static_cast<int64_t>(params.size());
    if (static_cast<int64_t>(prev_tokens.size()) != B || static_cast<int64_t>(positions.size()) != B ||
        static_cast<int64_t>(seeds.size()) != B)
        throw InputError("params, prev_tokens, positions and seeds must all have B entries");
    const Logits logits(logits_obj, B);
    const int64_t V = logits.vocab();
    for (int64_t b = 0; b < B; ++b) check_ids(params[b], prev_tokens[b], V, b);
    std::vector<int64_t> rows(B);
    std::iota(rows.begin(), rows.end(), 0);
    int64_t work = 0;
    for (const auto& p : params) work += row_work(p, V);
    std::vector<Draw> out(B);
    std::vector<std::string> errors(B);
    const float* data = logits.data();
    const Counts none;
    sample_rows(rows, threads, work, [&](int64_t b, Scratch& s) {
        const Counts& counts = params[b].penalized() ? count_tokens(prev_tokens[b], V, s) : none;
        return sample_row(data + b * V, V, params[b], counts, positions[b], seeds[b], b, s);
    }, out, errors);
    py::list tokens, logprobs;
    for (const auto& d : out) tokens.append(d.token), logprobs.append(d.logprob);
    return py::make_tuple(tokens, logprobs);
}

// ------------------------------------------------------------------------------------- DecodeLoop

// Why a row stopped; exported as engine._sampler.Finish, mirrored by engine.sampling.Finish.
enum Finish : int { kRunning = 0, kStopToken = 1, kStopString = 2, kLength = 3 };

class DecodeLoop {
  public:
    // The Python lists of the engine.sampling.DecodeLoop that drives this one, kept current by every
    // step: generated[b] and logprobs[b] (rows that asked for them) gain the step's token and its
    // log-prob, finished[b] / finish_reason[b] are set when row b stops, and running loses it.
    // (Doing this in Python after each step cost a small decode step ~3-5 us in a cold cache.)
    struct Record {
        std::vector<py::list> generated, logprobs;  // (the lists themselves: they are never replaced)
        py::list finished, finish_reason, running;
    };

    DecodeLoop(std::vector<Params> params, const std::vector<std::vector<int64_t>>& prompts, std::vector<std::string> token_bytes,
               const std::vector<uint64_t>& seeds, int threads, Record record)
        : token_bytes_(std::move(token_bytes)), threads_(threads), record_(std::move(record)) {
        const size_t B = params.size();
        if (prompts.size() != B || seeds.size() != B || record_.generated.size() != B || record_.logprobs.size() != B ||
            record_.finished.size() != B || record_.finish_reason.size() != B || record_.running.size() != B)
            throw InputError("params, prompts, seeds, generated, logprobs, finished, finish_reason and running must all have B entries");
        for (size_t b = 0; b < B; ++b) {
            Row r;
            r.prompt = prompts[b];
            if (params[b].penalized())
                for (int64_t tok : prompts[b]) r.add(tok);
            r.position = static_cast<int64_t>(prompts[b].size());
            r.seed = seeds[b];
            for (const auto& s : params[b].stop) r.keep = std::max(r.keep, s.size() - 1);
            if (!params[b].stop.empty() && token_bytes_.empty())
                throw InputError("token_bytes is required when a request has stop strings");
            r.p = std::move(params[b]);
            rows_.push_back(std::move(r));
            running_.push_back(static_cast<int64_t>(b));
        }
        tokens_.assign(B, -1), next_input_.assign(B, 0);
        draws_.resize(B), errors_.resize(B);
    }

    // One decode step: samples every running row, then appends the tokens and checks stops.
    // The tokens go to the buffer `tokens` (-1 for rows finished before this step, whose state
    // does not change) and the Record; `next_input` holds what the model reads next: the tokens,
    // a valid id for finished rows. Nothing changes when a row raises: every row is sampled before
    // any state is updated. One loop per batch: not for two threads at once.
    void step(const py::handle& logits_obj) {
        const int64_t B = static_cast<int64_t>(rows_.size());
        const Logits logits(logits_obj, B);
        const int64_t V = logits.vocab();
        if (vocab_ < 0) {
            for (int64_t b = 0; b < B; ++b) check_ids(rows_[b].p, rows_[b].prompt, V, b);
            for (auto& r : rows_) r.prompt = {};
            vocab_ = V;
        } else if (V != vocab_) {
            throw InputError("logits changed vocabulary size from V=" + std::to_string(vocab_) + " to V=" + std::to_string(V));
        }
        int64_t work = 0;
        for (int64_t b : running_) work += row_work(rows_[b].p, V);
        const float* data = logits.data();
        sample_rows(running_, threads_, work, [&](int64_t b, Scratch& s) {
            const Row& r = rows_[b];
            return sample_row(data + b * V, V, r.p, r.counts, r.position, r.seed, b, s);
        }, draws_, errors_);
        commit();
    }

    // A step whose tokens were drawn elsewhere (engine.device_sampling, on the GPU, from the same
    // per-row state): tokens[b], logprobs[b] of every row, of which the running rows' are appended
    // as step() appends its own draws. Same results as step().
    void append_drawn(const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& tokens,
                     const py::array_t<double, py::array::c_style | py::array::forcecast>& logprobs) {
        const auto B = static_cast<py::ssize_t>(rows_.size());
        if (tokens.ndim() != 1 || tokens.shape(0) != B || logprobs.ndim() != 1 || logprobs.shape(0) != B)
            throw InputError("tokens and logprobs must both be [B] = [" + std::to_string(B) + "]");
        for (int64_t b : running_)
            if (tokens.data()[b] < 0)
                throw InputError("tokens[" + std::to_string(b) + "] = " + std::to_string(tokens.data()[b]) + " is not a token id");
        for (int64_t b : running_) draws_[b] = {tokens.data()[b], logprobs.data()[b]};
        commit();
    }

    // The result buffers as numpy arrays that share this loop's memory (and keep it alive).
    static py::array tokens(py::object self) { return view(self, self.cast<DecodeLoop&>().tokens_); }
    static py::array next_input(py::object self) { return view(self, self.cast<DecodeLoop&>().next_input_); }

  private:
    struct Row {
        Params p;
        Counts counts;  // prompt + generated, updated as tokens are appended; only for rows with penalties
        std::unordered_map<int64_t, size_t> slot;  // token id -> its entry in counts
        std::vector<int64_t> prompt;  // kept until the first step has checked it against V
        std::string tail;  // the last `keep` generated bytes: enough to see a stop string straddle tokens
        size_t keep = 0;
        int64_t position = 0, generated = 0;
        uint64_t seed = 0;
        bool finished = false;

        void add(int64_t tok) {
            const auto [it, fresh] = slot.try_emplace(tok, counts.size());
            if (fresh)
                counts.emplace_back(tok, 1);
            else
                ++counts[it->second].second;
        }
    };

    template <class T>
    static py::array view(py::object self, std::vector<T>& buffer) {  // the vectors never grow after construction
        return py::array_t<T>(static_cast<py::ssize_t>(buffer.size()), buffer.data(), self);
    }

    // The running rows' draws_ into the result buffers, their state and the Record.
    void commit() {
        // Finish's names, lower-case (never freed: no Python object may be released after the interpreter)
        static const auto* reasons = new std::array<py::str, 4>{py::str("running"), py::str("stop_token"), py::str("stop_string"),
                                                                py::str("length")};
        std::fill(tokens_.begin(), tokens_.end(), -1);
        bool finished = false;
        for (int64_t b : running_) {
            const Draw& d = draws_[b];
            tokens_[b] = next_input_[b] = d.token;
            Row& r = rows_[b];
            record_.generated[b].append(d.token);
            if (r.p.logprobs) record_.logprobs[b].append(d.logprob);
            const int32_t code = append(r, d.token);
            if (code != kRunning) {
                r.finished = true, finished = true;
                record_.finished[b] = py::bool_(true), record_.finish_reason[b] = (*reasons)[code];
            }
        }
        if (!finished) return;
        running_.erase(std::remove_if(running_.begin(), running_.end(), [this](int64_t b) { return rows_[b].finished; }),
                       running_.end());
        py::list running;
        for (int64_t b : running_) running.append(b);
        record_.running[py::slice(0, record_.running.size(), 1)] = running;  // in place: Python holds this list
    }

    int32_t append(Row& r, int64_t tok) {
        if (r.p.penalized()) r.add(tok);
        ++r.position;
        ++r.generated;
        bool hit = false;
        if (!r.p.stop.empty()) {
            if (tok < static_cast<int64_t>(token_bytes_.size())) r.tail += token_bytes_[tok];
            for (const auto& s : r.p.stop) hit |= r.tail.find(s) != std::string::npos;
            if (r.tail.size() > r.keep) r.tail.erase(0, r.tail.size() - r.keep);
        }
        if (std::find(r.p.stop_ids.begin(), r.p.stop_ids.end(), tok) != r.p.stop_ids.end()) return kStopToken;
        if (hit) return kStopString;
        if (r.generated >= r.p.max_new_tokens) return kLength;
        return kRunning;
    }

    std::vector<Row> rows_;
    std::vector<int64_t> running_;  // rows not finished yet, ascending
    std::vector<std::string> token_bytes_;
    int threads_;
    int64_t vocab_ = -1;
    std::vector<int64_t> tokens_;  // the last step's tokens
    std::vector<int64_t> next_input_;
    Record record_;
    std::vector<Draw> draws_;  // per-step scratch, sized once
    std::vector<std::string> errors_;
};

// loop.stepper(result) is a plain CPython function f(logits) that runs loop.step(logits) and
// returns `result` (the Python loop's token tensor): the decode loop calls it once a step, and
// pybind11's dispatcher (argument casters, overload search) cost a small step's sampling ~2 us
// when caches are cold. Its `self` is a capsule holding the loop (kept alive) and the result.
struct Stepper {
    DecodeLoop* loop;
    py::object owner, result;
};

py::handle input_error_type;  // engine.errors.InputError, set at import

PyObject* call_stepper(PyObject* capsule, PyObject* logits) {
    auto* stepper = static_cast<Stepper*>(PyCapsule_GetPointer(capsule, nullptr));
    try {
        stepper->loop->step(logits);
        return stepper->result.inc_ref().ptr();
    } catch (py::error_already_set& e) {
        e.restore();
    } catch (const InputError& e) {
        PyErr_SetString(input_error_type.ptr(), e.what());
    } catch (const std::invalid_argument& e) {  // a row's NaN / all -inf logits, as pybind11 raises it elsewhere
        PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const std::exception& e) {
        PyErr_SetString(PyExc_RuntimeError, e.what());
    }
    return nullptr;
}

PyMethodDef stepper_def = {"step", call_stepper, METH_O, "step(logits [B, V] float32 NumPy array) -> the loop's tokens"};

py::object make_stepper(py::object loop, py::object result) {
    auto* stepper = new Stepper{&loop.cast<DecodeLoop&>(), loop, std::move(result)};
    PyObject* capsule = PyCapsule_New(stepper, nullptr, [](PyObject* c) { delete static_cast<Stepper*>(PyCapsule_GetPointer(c, nullptr)); });
    if (!capsule) {
        delete stepper;
        throw py::error_already_set();
    }
    PyObject* function = PyCFunction_New(&stepper_def, capsule);  // holds the capsule
    Py_DECREF(capsule);
    if (!function) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(function);
}

}  // namespace

PYBIND11_MODULE(_sampler, m) {
    m.doc() = "C++ token sampler (see engine/sampling.py for the documented semantics)";
    // a reference kept for the life of the process: the translator may run at any time
    input_error_type = py::object(py::module_::import("engine.errors").attr("InputError")).release();
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const InputError& e) {
            PyErr_SetString(input_error_type.ptr(), e.what());
        }
    });
    py::enum_<Finish>(m, "Finish")
        .value("RUNNING", kRunning)
        .value("STOP_TOKEN", kStopToken)
        .value("STOP_STRING", kStopString)
        .value("LENGTH", kLength);
    py::class_<Params>(m, "Params")
        .def(py::init([](double temperature, int64_t top_k, double top_p, double min_p, double repetition, double presence,
                         double frequency, std::vector<std::pair<int64_t, double>> bias, bool logprobs, std::vector<int64_t> stop_ids,
                         std::vector<std::string> stop, int64_t max_new_tokens) {
                 return Params{temperature, top_p,    min_p,           repetition, presence, frequency, top_k, max_new_tokens,
                               std::move(bias), logprobs, std::move(stop_ids), std::move(stop)};
             }),
             py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"), py::arg("repetition_penalty"),
             py::arg("presence_penalty"), py::arg("frequency_penalty"), py::arg("logit_bias"), py::arg("logprobs"),
             py::arg("stop_token_ids"), py::arg("stop"), py::arg("max_new_tokens"));
    m.def("set_pool_min_work", [](int64_t work) { pool_min_work = work; }, py::arg("work"),
          "Work (logits read, sampled rows weighted x8) from which a batch is spread over torch's OpenMP threads.");
    m.def("pool_min_work", [] { return pool_min_work.load(); });
    m.def("pool_calls", [] { return parallel::calls.load(); }, "Calls handed to torch's OpenMP threads so far.");
    m.def("sample", &sample, py::arg("logits"), py::arg("params"), py::arg("prev_tokens"), py::arg("positions"), py::arg("seeds"),
          py::arg("threads"), "Stateless batch sample: returns (tokens, logprobs); NaN logprob where not requested.");
    py::class_<DecodeLoop>(m, "DecodeLoop")
        .def(py::init([](std::vector<Params> params, const std::vector<std::vector<int64_t>>& prompts, std::vector<std::string> token_bytes,
                         const std::vector<uint64_t>& seeds, int threads, std::vector<py::list> generated, std::vector<py::list> logprobs,
                         py::list finished, py::list finish_reason, py::list running) {
                 return new DecodeLoop(std::move(params), prompts, std::move(token_bytes), seeds, threads,
                                       {std::move(generated), std::move(logprobs), finished, finish_reason, running});
             }),
             py::arg("params"), py::arg("prompts"), py::arg("token_bytes"), py::arg("seeds"), py::arg("threads"), py::arg("generated"),
             py::arg("logprobs"), py::arg("finished"), py::arg("finish_reason"), py::arg("running"))
        .def("stepper", &make_stepper, py::arg("result"),
             "A function f(logits) that samples one token per running row (logits: a C-contiguous float32 [B, V] NumPy "
             "array) into tokens and the record lists, and returns `result`.")
        .def("append_drawn", &DecodeLoop::append_drawn, py::arg("tokens"), py::arg("logprobs"),
             "A step with the tokens (and log-probs) drawn elsewhere, e.g. on the GPU: int64 [B], float64 [B].")
        .def_property_readonly("tokens", &DecodeLoop::tokens, "int64 [B]: the last step's tokens (-1: finished before it)")
        .def_property_readonly("next_input", &DecodeLoop::next_input, "int64 [B]: the tokens, a valid id for finished rows");
}
