// A fixed set of worker threads that share out the parts of one job and wait for all of them.
// Decode calls this a few hundred times per token, so workers spin briefly before sleeping.
//
// Parts are taken one at a time from a shared counter by whichever thread is free (the caller
// included), not assigned to threads: on a shared host a thread the OS has descheduled for a while
// takes fewer parts instead of stalling every matrix, and a worker that has not started when the
// parts run out is not waited for. The caller never gives up on the workers: running jobs alone
// after a worker held it up (descheduled while it held a part) cost Phi-4-shaped decode 10-40% on
// a shared 2-core host, where such waits come dozens of times a token (docs/BENCHMARKS.md). Which
// thread runs a part never changes what the part computes.
#pragma once
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace upg {

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);  // n_threads < 1: one per core
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_; }

  // Calls fn(part, size()) for every part in [0, size()), each once, on some thread; parts may run
  // one after another on one thread (never two at once on different threads). Returns when all have
  // returned; the first exception thrown by any call is rethrown here.
  void run(const std::function<void(int, int)>& fn);

  // Calls fn(begin, end) for the chunks [c * chunk, min(n, (c + 1) * chunk)) of [0, n), as run()
  // shares out its parts.
  void parallel_for(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn);

 private:
  void dispatch(int64_t parts, const std::function<void(int64_t)>& fn);
  void take_parts();  // runs parts of the open job until none is left
  void worker();

  int n_;
  std::vector<std::thread> threads_;
  // The open job: its parts, the next part to take, and the job's number in open_ (0: none open).
  // A worker counts itself in active_ before it looks at open_, and the caller, having closed the
  // job, waits for active_ to reach 0: so no worker touches a job after its caller has returned.
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t parts_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<uint64_t> open_{0};
  std::atomic<int> active_{0};
  uint64_t jobs_ = 0;  // jobs dispatched (the caller's side only)
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable wake_;
  std::exception_ptr error_;
};

// Splits [0, n) into `parts` contiguous ranges whose starts are multiples of `align`.
inline void split_range(int64_t n, int part, int parts, int64_t align, int64_t& begin, int64_t& end) {
  const int64_t chunks = (n + align - 1) / align;
  begin = std::min(n, chunks * part / parts * align);
  end = std::min(n, chunks * (part + 1) / parts * align);
}

}  // namespace upg
