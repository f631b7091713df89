// A fixed set of worker threads that run one function on every thread and wait for all of them.
// Decode calls this a few hundred times per token, so workers spin briefly before sleeping.
#pragma once
#include <atomic>
#include <condition_variable>
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

  // Calls fn(thread_index, n_threads) on every thread (the caller is thread 0) and returns when all
  // calls have returned. The first exception thrown by any call is rethrown here.
  void run(const std::function<void(int, int)>& fn);

 private:
  void worker(int index);
  int n_;
  std::vector<std::thread> threads_;
  const std::function<void(int, int)>* job_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
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
