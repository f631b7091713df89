// Fiber executor for the Metal harness (see runtime.h). One OS thread runs one threadgroup at a
// time: every GPU thread of the group is a ucontext fiber, and a fiber runs until it reaches a
// sync point (threadgroup_barrier, a simd_* call) or returns. A sync point releases its waiters
// only when every fiber of the threadgroup (barrier) or simdgroup (simd_*) arrived at the same
// call site; a group in which nobody can run any more is reported as a deadlock.
#include "runtime.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr unsigned kSimdWidth = 32;
constexpr unsigned kMaxThreads = 1024;
constexpr size_t kStackBytes = 128 * 1024;  // kernels keep small locals; a guard page below
constexpr size_t kGuardBytes = 4096;
constexpr unsigned kMaxGather = 256;  // bytes one lane may exchange per simd_* call

enum class State { Runnable, Waiting, Done };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  State state = State::Done;
  UpgBuiltins b;
};

struct SyncPoint {  // one barrier or simdgroup exchange in progress
  unsigned arrived = 0;
  const void* site = nullptr;
  unsigned size = 0;
};

struct Simdgroup {
  SyncPoint sync;
  unsigned first = 0, width = 0;  // fibers [first, first + width)
  unsigned generation = 0;        // exchanges alternate between two slot buffers
  unsigned char slots[2][kSimdWidth * kMaxGather];
};

struct Executor {
  std::vector<Fiber> fibers;
  std::vector<Simdgroup> simdgroups;
  SyncPoint barrier;
  ucontext_t scheduler;
  unsigned current = 0, n_threads = 0;
  UpgEntry entry = nullptr;
  void* const* bufs = nullptr;
  std::vector<std::vector<unsigned char>> tgmem_store;
  std::vector<void*> tgmem;
  std::string error;

  ~Executor() {
    for (Fiber& f : fibers) munmap(f.stack, kStackBytes + kGuardBytes);
  }

  bool ensure_fibers(unsigned n) {
    fibers.reserve(kMaxThreads);  // contexts must not move once made
    while (fibers.size() < n) {
      void* mem = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (mem == MAP_FAILED) return false;
      mprotect(mem, kGuardBytes, PROT_NONE);  // overflow faults instead of corrupting a neighbor
      fibers.emplace_back();
      fibers.back().stack = static_cast<char*>(mem);
      getcontext(&fibers.back().ctx);
    }
    return true;
  }

  void fail(const std::string& msg) {
    if (error.empty()) error = msg;
    fibers[current].state = State::Waiting;  // never resumed: the launch stops
    swapcontext(&fibers[current].ctx, &scheduler);
  }

  // Blocks the current fiber at `sp` until `expected` fibers arrived; the last one releases all.
  // Returns after release.
  void arrive(SyncPoint& sp, const void* site, unsigned size, unsigned expected, unsigned first,
              const char* what) {
    if (sp.arrived == 0) {
      sp.site = site;
      sp.size = size;
    } else if (sp.site != site || sp.size != size) {
      char msg[200];
      std::snprintf(msg, sizeof msg,
                    "divergent %s: thread %u reached a different call site than the threads "
                    "already waiting (every thread of the group must reach the same one)",
                    what, current);
      fail(msg);
    }
    if (++sp.arrived == expected) {
      sp.arrived = 0;
      for (unsigned i = first; i < first + expected; ++i)
        if (i != current) fibers[i].state = State::Runnable;
      return;
    }
    fibers[current].state = State::Waiting;
    swapcontext(&fibers[current].ctx, &scheduler);
  }

  static void trampoline();

  int run(const unsigned* groups, const unsigned* tg) {
    n_threads = tg[0] * tg[1] * tg[2];
    if (n_threads == 0 || n_threads > kMaxThreads) {
      error = "threads per threadgroup must be 1.." + std::to_string(kMaxThreads);
      return -1;
    }
    if (!ensure_fibers(n_threads)) {
      error = "cannot map fiber stacks";
      return -1;
    }
    const unsigned n_sg = (n_threads + kSimdWidth - 1) / kSimdWidth;
    simdgroups.assign(n_sg, Simdgroup());
    for (unsigned s = 0; s < n_sg; ++s) {
      simdgroups[s].first = s * kSimdWidth;
      simdgroups[s].width = n_threads - s * kSimdWidth < kSimdWidth ? n_threads - s * kSimdWidth
                                                                     : kSimdWidth;
    }
    for (unsigned gz = 0; gz < groups[2]; ++gz)
      for (unsigned gy = 0; gy < groups[1]; ++gy)
        for (unsigned gx = 0; gx < groups[0]; ++gx) {
          if (run_group(groups, tg, {gx, gy, gz}) != 0) return -1;
        }
    return 0;
  }

  int run_group(const unsigned* groups, const unsigned* tg, UpgU3 g) {
    barrier = SyncPoint();
    for (auto& m : tgmem_store) std::memset(m.data(), 0xff, m.size());  // contents are undefined
    for (Simdgroup& s : simdgroups) { s.sync = SyncPoint(); s.generation = 0; }
    for (unsigned t = 0; t < n_threads; ++t) {
      Fiber& f = fibers[t];
      UpgBuiltins& b = f.b;
      const UpgU3 local = {t % tg[0], t / tg[0] % tg[1], t / (tg[0] * tg[1])};
      b.threadgroup_position_in_grid = g;
      b.thread_position_in_threadgroup = local;
      b.threads_per_threadgroup = {tg[0], tg[1], tg[2]};
      b.threadgroups_per_grid = {groups[0], groups[1], groups[2]};
      b.threads_per_grid = {groups[0] * tg[0], groups[1] * tg[1], groups[2] * tg[2]};
      b.thread_position_in_grid = {g.x * tg[0] + local.x, g.y * tg[1] + local.y,
                                   g.z * tg[2] + local.z};
      b.thread_index_in_threadgroup = t;
      b.thread_index_in_simdgroup = t % kSimdWidth;
      b.simdgroup_index_in_threadgroup = t / kSimdWidth;
      b.threads_per_simdgroup = kSimdWidth;
      b.simdgroups_per_threadgroup = unsigned(simdgroups.size());
      f.ctx.uc_stack.ss_sp = f.stack + kGuardBytes;
      f.ctx.uc_stack.ss_size = kStackBytes;
      f.ctx.uc_link = &scheduler;
      makecontext(&f.ctx, &Executor::trampoline, 0);
      f.state = State::Runnable;
    }
    for (;;) {
      bool ran = false, all_done = true;
      for (unsigned t = 0; t < n_threads; ++t) {
        if (fibers[t].state == State::Runnable) {
          current = t;
          ran = true;
          swapcontext(&scheduler, &fibers[t].ctx);
          if (!error.empty()) return -1;
        }
        all_done = all_done && fibers[t].state == State::Done;
      }
      if (all_done) return 0;
      if (!ran) {
        error = "deadlock in threadgroup (" + std::to_string(g.x) + "," + std::to_string(g.y) +
                "," + std::to_string(g.z) + "): threads wait at a barrier or simd_* call that " +
                "others never reach (an early return or a divergent branch)";
        return -1;
      }
    }
  }
};

Executor* g_exec = nullptr;

void Executor::trampoline() {
  Executor& ex = *g_exec;
  Fiber& f = ex.fibers[ex.current];
  ex.entry(ex.bufs, ex.tgmem.data(), &f.b);
  f.state = State::Done;  // uc_link returns to the scheduler
}

}  // namespace

extern "C" {

void upg_rt_threadgroup_barrier(const void* site) {
  g_exec->arrive(g_exec->barrier, site, 0, g_exec->n_threads, 0, "threadgroup_barrier");
}

unsigned upg_rt_simd_gather(const void* mine, unsigned size, void* all, unsigned* n_lanes,
                            const void* site) {
  Executor& ex = *g_exec;
  const unsigned t = ex.current, lane = t % kSimdWidth;
  if (size > kMaxGather) ex.fail("simd_*: value too large for the harness");
  Simdgroup& sg = ex.simdgroups[t / kSimdWidth];
  const unsigned gen = sg.generation;
  std::memcpy(sg.slots[gen & 1] + lane * size, mine, size);
  if (sg.sync.arrived + 1 == sg.width) ++sg.generation;  // the last lane flips the buffer
  ex.arrive(sg.sync, site, size, sg.width, sg.first, "simd_* call");
  // Lanes reach the next exchange only after all left this one, so slots[gen & 1] is stable until
  // every lane copied it (the next exchange writes the other buffer).
  std::memcpy(all, sg.slots[gen & 1], size * sg.width);
  *n_lanes = sg.width;
  return lane;
}

void upg_rt_fail(const char* message) { g_exec->fail(message); }

int upg_rt_launch(UpgEntry entry, void* const* bufs, const unsigned* groups, const unsigned* tg,
                  const uint64_t* tgmem_bytes, unsigned n_tgmem, char* err, int errlen) {
  static Executor ex;  // fibers and stacks are reused across launches
  g_exec = &ex;
  ex.entry = entry;
  ex.bufs = bufs;
  ex.error.clear();
  ex.tgmem_store.assign(n_tgmem, {});
  ex.tgmem.assign(n_tgmem, nullptr);
  for (unsigned i = 0; i < n_tgmem; ++i) {
    ex.tgmem_store[i].resize(tgmem_bytes[i]);
    ex.tgmem[i] = ex.tgmem_store[i].data();
  }
  const int rc = ex.run(groups, tg);
  if (rc != 0) std::snprintf(err, errlen, "%s", ex.error.c_str());
  return rc;
}

}  // extern "C"
