// A persistent pool of worker threads, shared by the extensions' batch loops (one pool per
// extension module). Each call hands out task indices; the calling thread works too.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include <unistd.h>  // getpid

namespace worker_pool {

// Persistent workers: starting threads every step cost more than sampling a small batch. They
// sleep on a condition variable between jobs; spinning would take the cores that torch's own
// threads need for the forward.
class WorkerPool {
  public:
    static WorkerPool& instance() {
        static std::mutex mutex;
        static WorkerPool* pool = nullptr;  // never destroyed: safe at interpreter exit
        std::lock_guard<std::mutex> lock(mutex);
        if (pool == nullptr || pool->pid_ != getpid()) pool = new WorkerPool();  // a forked child has no workers: start anew
        return *pool;
    }

    // Calls task(i) for every i in [0, n) on the calling thread and up to `helpers` workers, and
    // returns once all are done. One job at a time: a caller that finds the pool busy works alone.
    template <class Task>
    void run(int64_t n, int helpers, Task& task) {
        std::unique_lock<std::mutex> job(job_mutex_, std::try_to_lock);
        if (helpers <= 0 || !job.owns_lock()) {
            for (int64_t i = 0; i < n; ++i) task(i);
            return;
        }
        {
            std::lock_guard<std::mutex> lock(mutex_);
            while (static_cast<int>(workers_.size()) < helpers) workers_.emplace_back(&WorkerPool::work, this, workers_.size());
            task_ = &task;
            call_ = [](void* t, int64_t i) { (*static_cast<Task*>(t))(i); };
            n_ = n;
            next_ = 0;
            helpers_ = helpers;
            open_ = true;
            ++generation_;
        }
        wake_.notify_all();
        drain();
        std::unique_lock<std::mutex> lock(mutex_);
        open_ = false;  // workers that wake up from now on find nothing to do: don't wait for them
        done_.wait(lock, [this] { return busy_ == 0; });
    }

    size_t size() {
        std::lock_guard<std::mutex> lock(mutex_);
        return workers_.size();
    }

  private:
    WorkerPool() : pid_(getpid()) {}

    void drain() {
        for (int64_t i; (i = next_.fetch_add(1)) < n_;) call_(task_, i);
    }

    void work(size_t id) {
        uint64_t seen = 0;
        for (;;) {
            {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [&] { return generation_ != seen; });
                seen = generation_;
                if (!open_ || static_cast<int>(id) >= helpers_) continue;
                ++busy_;
            }
            drain();
            std::lock_guard<std::mutex> lock(mutex_);
            if (--busy_ == 0) done_.notify_all();
        }
    }

    const pid_t pid_;
    std::mutex job_mutex_, mutex_;
    std::condition_variable wake_, done_;
    std::vector<std::thread> workers_;  // detached in effect: the pool is never destroyed
    void* task_ = nullptr;
    void (*call_)(void*, int64_t) = nullptr;
    int64_t n_ = 0;
    std::atomic<int64_t> next_{0};
    int helpers_ = 0, busy_ = 0;
    bool open_ = false;
    uint64_t generation_ = 0;
};

}  // namespace worker_pool
