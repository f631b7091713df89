#include "upg/threadpool.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace upg {

namespace {

// One step of a wait that keeps the core: a yield hands it to any other runnable process, and on a
// shared host that one keeps it for a whole time slice (milliseconds) while the part we wait for
// takes microseconds.
inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// Pause steps before a wait starts yielding: on the order of 50 microseconds, longer than the
// small ops between two mat-vecs take (the mat-vec parts themselves are 64 KiB to 4 MiB of
// weights: kernels.h's matmul_chunk_rows).
constexpr int kPauseSpins = 2000;

}  // namespace

ThreadPool::ThreadPool(int n_threads)
    : n_(n_threads > 0 ? n_threads : int(std::max(1u, std::thread::hardware_concurrency()))) {
  for (int i = 1; i < n_; ++i) threads_.emplace_back(&ThreadPool::worker, this);
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& t : threads_) t.join();
}

void ThreadPool::run(const std::function<void(int, int)>& fn) {
  dispatch(n_, [&](int64_t part) { fn(int(part), n_); });
}

void ThreadPool::parallel_for(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  chunk = std::max<int64_t>(1, chunk);
  dispatch((n + chunk - 1) / chunk, [&](int64_t c) { fn(c * chunk, std::min(n, (c + 1) * chunk)); });
}

void ThreadPool::dispatch(int64_t parts, const std::function<void(int64_t)>& fn) {
  if (n_ == 1 || parts == 1) {
    for (int64_t p = 0; p < parts; ++p) fn(p);
    return;
  }
  // No worker is inside a job here (the last dispatch waited for them), so these are ours to write.
  job_ = &fn;
  parts_ = parts;
  error_ = nullptr;
  next_.store(0, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(mu_);  // a worker about to sleep sees the job or the notify
    open_.store(++jobs_, std::memory_order_seq_cst);
  }
  wake_.notify_all();
  take_parts();
  open_.store(0, std::memory_order_seq_cst);  // late workers now leave without touching the job
  for (int spin = 0; active_.load(std::memory_order_seq_cst) != 0; ++spin) {
    if (spin < kPauseSpins) spin_pause();
    else std::this_thread::yield();
  }
  job_ = nullptr;
  if (error_) std::rethrow_exception(error_);
}

void ThreadPool::take_parts() {
  for (int64_t p; (p = next_.fetch_add(1, std::memory_order_relaxed)) < parts_;) {
    try {
      (*job_)(p);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_) error_ = std::current_exception();
    }
  }
}

void ThreadPool::worker() {
  uint64_t seen = 0;
  const auto fresh = [&] {
    const uint64_t j = open_.load(std::memory_order_acquire);
    return j != 0 && j != seen;
  };
  for (;;) {
    // Spin a little: the next job usually follows within microseconds during decode.
    for (int spin = 0; spin < kPauseSpins + 20000 && !fresh() && !stop_; ++spin) {
      if (spin < kPauseSpins) spin_pause();
      else std::this_thread::yield();
    }
    if (!fresh()) {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return stop_ || fresh(); });
    }
    if (stop_) return;
    active_.fetch_add(1, std::memory_order_seq_cst);
    const uint64_t j = open_.load(std::memory_order_seq_cst);
    if (j != 0 && j != seen) {
      seen = j;
      take_parts();
    }
    active_.fetch_sub(1, std::memory_order_release);
  }
}

}  // namespace upg
