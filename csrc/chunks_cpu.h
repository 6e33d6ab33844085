// Chunks of a memory-bound loop over the threads, each thread streaming its own contiguous share first and then
// taking the last chunks of the shares still running.
//
// A decode step's products stream their weight from DRAM, one contiguous half per core. On this VM the two cores
// do not get the same bandwidth: measured over a decode step of the benchmark's INT4 model, the core that finished
// its half first waited 0.2-2.6 ms a step (of ~15), 287 us of every 5 ms LM head. With a static split that wait is
// lost; here the faster thread takes the slower one's remaining chunks from the far end, where the owner's own
// prefetches have not reached yet, so the two never contend for the same lines.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

namespace glm_kernels {

// One thread's share [front, back) of the chunks, as one 64-bit word (front in the low half) so that the owner
// taking from the front and a thief taking from the back agree on the last chunk with one compare-exchange. One
// cache line each, so the owners' updates do not bounce a shared line between the cores.
struct alignas(64) ChunkShare {
  std::atomic<uint64_t> word{0};

  void set(int64_t front, int64_t back) {
    word.store(static_cast<uint64_t>(front) | static_cast<uint64_t>(back) << 32, std::memory_order_relaxed);
  }
  // the chunk taken, or -1 when the share is empty
  int64_t take(bool from_front) {
    uint64_t v = word.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t front = v & 0xFFFFFFFFu, back = v >> 32;
      if (front >= back) return -1;
      const uint64_t next = from_front ? (front + 1) | back << 32 : front | (back - 1) << 32;
      if (word.compare_exchange_weak(v, next, std::memory_order_relaxed)) {
        return static_cast<int64_t>(from_front ? front : back - 1);
      }
    }
  }
};

// fn(c) for every chunk c in [0, chunks), each exactly once. Thread t first runs chunks [chunks * t / T,
// chunks * (t + 1) / T) in order (T = at::get_num_threads(), as at::parallel_for would split them), then the
// other shares' chunks from their ends. Inside another parallel region at::parallel_for runs inline, and one
// thread then runs every share in order.
template <typename F>
void parallel_chunks(int64_t chunks, const F& fn) {
  if (chunks <= 0) return;
  TORCH_CHECK(chunks < (int64_t{1} << 31), "parallel_chunks: too many chunks (", chunks, ")");
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), chunks));
  std::unique_ptr<ChunkShare[]> shares(new ChunkShare[threads]);
  for (int64_t t = 0; t < threads; ++t) shares[t].set(chunks * t / threads, chunks * (t + 1) / threads);
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t c; (c = shares[t].take(true)) >= 0;) fn(c);
    for (int64_t i = 1; i < threads; ++i) {  // the next share first, round the others
      ChunkShare& other = shares[(t1 - 1 + i) % threads];
      for (int64_t c; (c = other.take(false)) >= 0;) fn(c);
    }
  });
}

}  // namespace glm_kernels
