// Segment-list copy on the GPU: one launch moves every (src, dst, len) segment of a chunk,
// across all layers, K and V. Gather (paged blocks -> contiguous chunk), scatter (the reverse)
// and the NHD<->HND transform are all segment lists built by pd/kv_copy.py; element type does
// not matter (bytes), so fp16/bf16/fp32/fp8 share one kernel.
#include <cstdint>
#include <cuda_runtime.h>

namespace {

constexpr int kThreads = 512;

__global__ void copy_segments(const uint64_t* __restrict__ src, const uint64_t* __restrict__ dst,
                              const uint64_t* __restrict__ len, int64_t n) {
  for (int64_t s = blockIdx.x; s < n; s += gridDim.x) {
    const uint64_t a = src[s], b = dst[s], nbytes = len[s];
    if (((a | b | nbytes) & 15u) == 0) {
      const uint4* s4 = reinterpret_cast<const uint4*>(a);
      uint4* d4 = reinterpret_cast<uint4*>(b);
      for (uint64_t i = threadIdx.x; i < nbytes / 16; i += blockDim.x) d4[i] = s4[i];
    } else {
      const uint8_t* s1 = reinterpret_cast<const uint8_t*>(a);
      uint8_t* d1 = reinterpret_cast<uint8_t*>(b);
      for (uint64_t i = threadIdx.x; i < nbytes; i += blockDim.x) d1[i] = s1[i];
    }
  }
}

}  // namespace

// src/dst/len are device arrays of n entries. Returns a cudaError_t value (0 = success).
extern "C" int kvb_copy_segments_cuda(const uint64_t* src, const uint64_t* dst, const uint64_t* len, int64_t n,
                                      void* stream) {
  if (n <= 0) return 0;
  const int64_t blocks = n < 65535 ? n : 65535;
  copy_segments<<<static_cast<unsigned int>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      src, dst, len, n);
  return static_cast<int>(cudaGetLastError());
}
