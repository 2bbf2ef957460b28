// Parallel loops for the extensions' batch work (decode attention's rows and heads, the sampler's
// rows), run on the OpenMP threads torch already has.
//
// torch's CPU builds run their ops on an OpenMP runtime (libgomp on Linux, LLVM's libomp on macOS,
// which answers to the same GOMP entry points) whose symbols torch puts in the process's global
// scope. Handing our loops to that runtime, found with dlsym, means our work runs on the threads
// that run torch's ops: they are awake and spinning right after the previous op, so a hand-off
// costs microseconds, and no second set of threads competes with them for the cores. (A pool of
// our own, woken through a condition variable, lost to one thread below ~4 MB of cache read per
// call on 2 vCPUs, and fought torch's spinning workers above it; measured in issue 21.) We do not
// link an OpenMP runtime ourselves: a second one in the process would bring its own threads.
// Without a runtime in the process (torch not imported, or built without OpenMP), loops run on the
// calling thread.
#pragma once

#include <atomic>
#include <cstdint>

#include <dlfcn.h>   // dlsym
#include <unistd.h>  // getpid

namespace parallel {

inline const pid_t loaded_in = getpid();  // the process that loaded the extension

using ParallelFn = void (*)(void (*)(void*), void*, unsigned, unsigned);  // GOMP_parallel's

// The runtime's GOMP_parallel, or null: looked up until found (the extension may load before
// torch). A forked child gets null and runs serially: an OpenMP runtime's threads do not survive a
// fork (torch's own ops hang in a child forked after they ran on several threads, hence
// DataLoader workers' one thread).
inline ParallelFn gomp_parallel() {
    static std::atomic<ParallelFn> found{nullptr};
    if (getpid() != loaded_in) return nullptr;
    ParallelFn fn = found.load();
    if (fn == nullptr) found = fn = reinterpret_cast<ParallelFn>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
    return fn;
}

// Calls handed to the OpenMP runtime so far (tests check that a big call really went there).
inline std::atomic<int64_t> calls{0};

// Calls task(i) for every i in [0, n) on up to `threads` threads (the calling thread is one of
// them) and returns when all are done. Indices are handed out one at a time, so uneven rows
// balance. task must not throw: catch inside it.
template <class Task>
void run(int64_t n, int threads, Task& task) {
    const ParallelFn parallel = threads > 1 && n > 1 ? gomp_parallel() : nullptr;
    if (parallel == nullptr) {
        for (int64_t i = 0; i < n; ++i) task(i);
        return;
    }
    struct Job {
        Task* task;
        int64_t n;
        std::atomic<int64_t> next{0};
    } job{&task, n};
    ++calls;
    parallel(
        [](void* p) {
            Job& j = *static_cast<Job*>(p);
            for (int64_t i; (i = j.next.fetch_add(1)) < j.n;) (*j.task)(i);
        },
        &job, static_cast<unsigned>(threads < n ? threads : n), 0);
}

}  // namespace parallel
