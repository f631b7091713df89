// The CPU executor of the Metal harness: runs a kernel's threadgroups one after another, each GPU
// thread a fiber, with counted threadgroup barriers and simdgroup exchanges (DESIGN.md, "Metal
// without a Mac"). The generated launchers (harness.py) call upg_rt_launch.
#pragma once
#include <stdint.h>

struct UpgU3 { unsigned x, y, z; };

// The built-in indices of one thread, by their MSL attribute names.
struct UpgBuiltins {
  UpgU3 thread_position_in_grid;
  UpgU3 threadgroup_position_in_grid;
  UpgU3 thread_position_in_threadgroup;
  UpgU3 threads_per_threadgroup;
  UpgU3 threadgroups_per_grid;
  UpgU3 threads_per_grid;
  unsigned thread_index_in_threadgroup;
  unsigned thread_index_in_simdgroup;
  unsigned simdgroup_index_in_threadgroup;
  unsigned threads_per_simdgroup;
  unsigned simdgroups_per_threadgroup;
};

// Calls the kernel for one thread: bufs[i] is buffer(i), tgmem[i] is threadgroup(i).
typedef void (*UpgEntry)(void* const* bufs, void* const* tgmem, const UpgBuiltins* b);

extern "C" {
// Runs groups[0] x groups[1] x groups[2] threadgroups of tg[0] x tg[1] x tg[2] threads (at most
// 1024). Threadgroup memory i has tgmem_bytes[i] bytes, refilled with 0xff (NaN as floats) for
// every threadgroup so that reading before writing shows. Returns 0, or -1 with a message in err.
int upg_rt_launch(UpgEntry entry, void* const* bufs, const unsigned* groups, const unsigned* tg,
                  const uint64_t* tgmem_bytes, unsigned n_tgmem, char* err, int errlen);
}
