// Segment-list copy on the CPU: the same semantics as kv_copy.cu, used on CPU nodes and as the
// reference the CUDA kernel is tested against.
#include <cstdint>
#include <cstring>

extern "C" int kvb_copy_segments_cpu(const uint64_t* src, const uint64_t* dst, const uint64_t* len, int64_t n) {
#pragma omp parallel for schedule(static) if (n > 64)
  for (int64_t s = 0; s < n; ++s) {
    std::memcpy(reinterpret_cast<void*>(dst[s]), reinterpret_cast<const void*>(src[s]), len[s]);
  }
  return 0;
}
