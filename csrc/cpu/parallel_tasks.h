// Tasks of uneven size (a class's work grows as its size squared) handed out one at a time
// to ATen's threads: at::parallel_for cuts its range into one contiguous piece per thread, so
// a run of large classes leaves the other threads waiting at the join. Each task must write
// only its own outputs, so the results do not depend on which thread runs it. Tasks run with
// denormals flushed (flush_denormals.h).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "cpu/flush_denormals.h"

namespace metrix_ops {

// fn(k) for every k in [0, n)
template <class Fn>
void parallel_tasks(int64_t n, Fn&& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const FlushDenormals ftz;
    for (int64_t k = next.fetch_add(1, std::memory_order_relaxed); k < n;
         k = next.fetch_add(1, std::memory_order_relaxed))
      fn(k);
  });
}

// fn(k, state) for every k in [0, n), with one default-constructed State per worker that
// its tasks share (a scratch buffer, allocated once per worker rather than once per task)
template <class State, class Fn>
void parallel_tasks_with(int64_t n, Fn&& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const FlushDenormals ftz;
    State state;
    for (int64_t k = next.fetch_add(1, std::memory_order_relaxed); k < n;
         k = next.fetch_add(1, std::memory_order_relaxed))
      fn(k, state);
  });
}

}  // namespace metrix_ops
