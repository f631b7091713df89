// The machine's memory read bandwidth, the roofline that decode speed is measured against.
#pragma once
#include <cstdint>

namespace upg {

// Reads a buffer of `bytes` with n_threads threads, `reps` times after one warm-up pass; returns the
// best rate in GB/s (1e9 bytes per second).
double measure_read_bandwidth(uint64_t bytes, int n_threads, int reps);

}  // namespace upg
