// engine._sampler: the C++ token sampler. Same documented order and the same arithmetic as the
// reference in engine/sampling.py (read its module docstring first), so both pick identical tokens:
//
//   penalties -> logit bias -> temperature -> top-k -> top-p -> min-p -> Gumbel-max draw
//
// Work per row is O(V) plus O(k log k): top-k by a bounded heap scan (no sort of the vocabulary),
// top-p on the ranked top-k survivors (or, without top-k, on a ranking grown chunk by chunk with
// nth_element until the mass is reached), min-p in one linear pass, the draw without a cumulative
// sum. Rows are spread over a bounded number of std::threads with the GIL released. DecodeLoop
// keeps each sequence's token counts and stop-string tail and updates them as tokens are appended.
//
// Built with -ffp-contract=off: a fused multiply-add would change roundings the reference makes.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

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

// x = the row widened to float64, then penalties and bias. Throws on NaN, +inf, all -inf.
void process(const float* row, int64_t V, const Params& p, const Counts& counts, int64_t b, std::vector<double>& x) {
    x.resize(V);
    double* __restrict out = x.data();
    int bad = 0;  // NaN or +inf: one comparison; an int so that the loop vectorises
    for (int64_t i = 0; i < V; ++i) {
        bad |= !(row[i] < std::numeric_limits<float>::infinity());
        out[i] = row[i];
    }
    if (bad) throw std::invalid_argument(row_error(b, std::any_of(row, row + V, [](float v) { return v != v; }) ? "contains NaN" : "contains +inf"));
    for (const auto& [tok, n] : counts) {
        double v = x[tok];
        v = v > 0 ? v / p.repetition : v * p.repetition;
        x[tok] = v - (p.presence + p.frequency * static_cast<double>(n));
    }
    for (const auto& [tok, add] : p.bias) x[tok] += add;
}

// Top-k by a heap scan: ids of the k best tokens (x descending, id ascending), ranked.
void top_k(const std::vector<double>& x, int64_t k, std::vector<int32_t>& idx) {
    const auto better = [&x](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); };
    const int64_t V = static_cast<int64_t>(x.size());
    idx.resize(k);
    std::iota(idx.begin(), idx.end(), 0);
    std::make_heap(idx.begin(), idx.end(), better);  // front = the worst kept token
    double worst = x[idx.front()];
    for (int64_t i = k; i < V; ++i) {
        if (x[i] > worst) {  // a later id never wins a tie
            std::pop_heap(idx.begin(), idx.end(), better);
            idx.back() = static_cast<int32_t>(i);
            std::push_heap(idx.begin(), idx.end(), better);
            worst = x[idx.front()];
        }
    }
    std::sort(idx.begin(), idx.end(), better);
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
    idx.clear();
    for (int64_t i = 0; i < V; ++i)
        if (w[i] >= tau) idx.push_back(static_cast<int32_t>(i));
    const int64_t n = static_cast<int64_t>(idx.size());
    double cum = 0;
    for (int64_t done = 0, chunk = 64; done < n; done += chunk, chunk *= 4) {
        const int64_t end = std::min(n, done + chunk);
        if (end < n) std::nth_element(idx.begin() + done, idx.begin() + end, idx.end(), better);
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

Draw sample_row(const float* row, int64_t V, const Params& p, const Counts& counts, int64_t position, uint64_t seed, int64_t b,
                Scratch& s) {
    auto& x = s.x;
    process(row, V, p, counts, b, x);
    const int64_t k = p.temperature > 0 && p.top_k > 0 && p.top_k < V ? p.top_k : V;
    int64_t argmax = 0;
    if (k < V) {
        top_k(x, k, s.idx);  // ranked: its first token is the maximum
        argmax = s.idx[0];
    } else {
        for (int64_t i = 1; i < V; ++i)
            if (x[i] > x[argmax]) argmax = i;  // first maximum: ties to the lowest id
    }
    const double xmax = x[argmax];
    if (xmax == -kInf) throw std::invalid_argument(row_error(b, "is -inf everywhere (after logit bias): nothing can be sampled"));

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

class ScratchPool {  // buffers outlive the short-lived worker threads
  public:
    std::unique_ptr<Scratch> get() {
        std::lock_guard<std::mutex> lock(mutex_);
        if (free_.empty()) return std::make_unique<Scratch>();
        auto s = std::move(free_.back());
        free_.pop_back();
        return s;
    }
    void put(std::unique_ptr<Scratch> s) {
        std::lock_guard<std::mutex> lock(mutex_);
        free_.push_back(std::move(s));
    }

  private:
    std::mutex mutex_;
    std::vector<std::unique_ptr<Scratch>> free_;
};

ScratchPool& scratch_pool() {
    static ScratchPool* pool = new ScratchPool();  // never destroyed: safe at interpreter exit
    return *pool;
}

// Samples rows b with active[b] on min(threads, rows) threads, GIL released. A row's error
// (NaN, all -inf) is rethrown for the lowest such row, as ValueError, once all rows are done.
template <class RowFn>
std::vector<Draw> sample_rows(int64_t B, int64_t V, int threads, const std::vector<bool>& active, RowFn row_fn) {
    std::vector<Draw> out(B);
    std::vector<std::string> errors(B);
    {
        py::gil_scoped_release release;
        std::atomic<int64_t> next{0};
        const auto worker = [&]() {
            auto scratch = scratch_pool().get();
            for (int64_t b; (b = next.fetch_add(1)) < B;) {
                if (!active[b]) continue;
                try {
                    out[b] = row_fn(b, *scratch);
                } catch (const std::exception& e) {
                    errors[b] = e.what();
                }
            }
            scratch_pool().put(std::move(scratch));
        };
        // A thread costs ~10-50 us to start: only worth it for a few thousand logits per thread.
        const int64_t useful = std::max<int64_t>(1, B * V / 4096);
        const int n = static_cast<int>(std::min<int64_t>({std::max(threads, 1), B, useful}));
        std::vector<std::thread> pool;
        for (int i = 1; i < n; ++i) pool.emplace_back(worker);
        worker();
        for (auto& th : pool) th.join();
    }
    for (const auto& e : errors)
        if (!e.empty()) throw std::invalid_argument(e);
    return out;
}

using Logits = py::array_t<float, py::array::c_style | py::array::forcecast>;

int64_t vocab_of(const Logits& logits, int64_t batch) {
    if (logits.ndim() != 2 || logits.shape(0) != batch || logits.shape(1) < 1)
        throw InputError("logits must be [B=" + std::to_string(batch) + ", V>=1] float32");
    if (logits.shape(1) > std::numeric_limits<int32_t>::max()) throw InputError("vocabulary larger than 2^31");
    return logits.shape(1);
}

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
py::tuple sample(const Logits& logits, const std::vector<Params>& params, const std::vector<std::vector<int64_t>>& prev_tokens,
                 const std::vector<int64_t>& positions, const std::vector<uint64_t>& seeds, int threads) {
    const int64_t B = static_cast<int64_t>(params.size());
    if (static_cast<int64_t>(prev_tokens.size()) != B || static_cast<int64_t>(positions.size()) != B ||
        static_cast<int64_t>(seeds.size()) != B)
        throw InputError("params, prev_tokens, positions and seeds must all have B entries");
    const int64_t V = vocab_of(logits, B);
    for (int64_t b = 0; b < B; ++b) check_ids(params[b], prev_tokens[b], V, b);
    const float* data = logits.data();
    const auto out = sample_rows(B, V, threads, std::vector<bool>(B, true), [&](int64_t b, Scratch& s) {
        return sample_row(data + b * V, V, params[b], count_tokens(prev_tokens[b], V, s), positions[b], seeds[b], b, s);
    });
    py::list tokens, logprobs;
    for (const auto& d : out) tokens.append(d.token), logprobs.append(d.logprob);
    return py::make_tuple(tokens, logprobs);
}

// ------------------------------------------------------------------------------------- DecodeLoop

// Why a row stopped; exported as engine._sampler.Finish, mirrored by engine.sampling.Finish.
enum Finish : int { kRunning = 0, kStopToken = 1, kStopString = 2, kLength = 3 };

class DecodeLoop {
  public:
    DecodeLoop(std::vector<Params> params, const std::vector<std::vector<int64_t>>& prompts, std::vector<std::string> token_bytes,
               const std::vector<uint64_t>& seeds, int threads)
        : token_bytes_(std::move(token_bytes)), threads_(threads) {
        if (prompts.size() != params.size() || seeds.size() != params.size())
            throw InputError("params, prompts and seeds must all have B entries");
        for (size_t b = 0; b < params.size(); ++b) {
            Row r;
            r.prompt = prompts[b];
            for (int64_t tok : prompts[b]) r.add(tok);
            r.position = static_cast<int64_t>(prompts[b].size());
            r.seed = seeds[b];
            for (const auto& s : params[b].stop) r.keep = std::max(r.keep, s.size() - 1);
            if (!params[b].stop.empty() && token_bytes_.empty())
                throw InputError("token_bytes is required when a request has stop strings");
            r.p = std::move(params[b]);
            rows_.push_back(std::move(r));
        }
    }

    // One decode step: samples every unfinished row, then appends the tokens and checks stops.
    // Returns (tokens, logprobs, finish codes); finished rows get -1 and keep their state.
    // Not to be called from two Python threads at once on the same loop (one loop per batch).
    // Nothing changes when a row raises: every row is sampled before any state is updated.
    py::tuple step(const Logits& logits) {
        const int64_t B = static_cast<int64_t>(rows_.size());
        const int64_t V = vocab_of(logits, B);
        if (vocab_ < 0) {
            for (int64_t b = 0; b < B; ++b) check_ids(rows_[b].p, rows_[b].prompt, V, b);
            for (auto& r : rows_) r.prompt = {};
            vocab_ = V;
        } else if (V != vocab_) {
            throw InputError("logits changed vocabulary size from V=" + std::to_string(vocab_) + " to V=" + std::to_string(V));
        }
        std::vector<bool> active(B);
        for (int64_t b = 0; b < B; ++b) active[b] = !rows_[b].finished;
        const float* data = logits.data();
        const auto out = sample_rows(B, V, threads_, active, [&](int64_t b, Scratch& s) {
            const Row& r = rows_[b];
            return sample_row(data + b * V, V, r.p, r.counts, r.position, r.seed, b, s);
        });
        py::list tokens, logprobs, reasons;
        for (int64_t b = 0; b < B; ++b) {
            const int code = active[b] ? append(rows_[b], out[b].token) : kRunning;
            tokens.append(out[b].token), logprobs.append(out[b].logprob), reasons.append(code);
        }
        return py::make_tuple(tokens, logprobs, reasons);
    }

  private:
    struct Row {
        Params p;
        Counts counts;  // prompt + generated, updated as tokens are appended
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

    int append(Row& r, int64_t tok) {
        r.add(tok);
        ++r.position;
        ++r.generated;
        bool hit = false;
        if (!r.p.stop.empty()) {
            if (tok < static_cast<int64_t>(token_bytes_.size())) r.tail += token_bytes_[tok];
            for (const auto& s : r.p.stop) hit |= r.tail.find(s) != std::string::npos;
            if (r.tail.size() > r.keep) r.tail.erase(0, r.tail.size() - r.keep);
        }
        int code = kRunning;
        if (std::find(r.p.stop_ids.begin(), r.p.stop_ids.end(), tok) != r.p.stop_ids.end())
            code = kStopToken;
        else if (hit)
            code = kStopString;
        else if (r.generated >= r.p.max_new_tokens)
            code = kLength;
        r.finished = code != kRunning;
        return code;
    }

    std::vector<Row> rows_;
    std::vector<std::string> token_bytes_;
    int threads_;
    int64_t vocab_ = -1;
};

}  // namespace

PYBIND11_MODULE(_sampler, m) {
    m.doc() = "C++ token sampler (see engine/sampling.py for the documented semantics)";
    // a reference kept for the life of the process: the translator may run at any time
    static py::handle input_error = py::object(py::module_::import("engine.errors").attr("InputError")).release();
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const InputError& e) {
            PyErr_SetString(input_error.ptr(), e.what());
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
    m.def("sample", &sample, py::arg("logits"), py::arg("params"), py::arg("prev_tokens"), py::arg("positions"), py::arg("seeds"),
          py::arg("threads"), "Stateless batch sample: returns (tokens, logprobs); NaN logprob where not requested.");
    py::class_<DecodeLoop>(m, "DecodeLoop")
        .def(py::init<std::vector<Params>, const std::vector<std::vector<int64_t>>&, std::vector<std::string>,
                      const std::vector<uint64_t>&, int>(),
             py::arg("params"), py::arg("prompts"), py::arg("token_bytes"), py::arg("seeds"), py::arg("threads"))
        .def("step", &DecodeLoop::step, py::arg("logits"), "Sample one token per unfinished row: (tokens, logprobs, finish codes).");
}
