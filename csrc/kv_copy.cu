// Segment-list copy on the GPU: one launch moves every (src, dst, len) segment of a chunk,
// across all layers, K and V. Gather (paged blocks -> contiguous chunk), scatter (the reverse)
// and the NHD<->HND transform are all segment lists built by pd/kv_copy.py; element type does
// not matter (bytes), so fp16/bf16/fp32/fp8 share one kernel.
//
// One thread block per segment (grid-strided). Each thread keeps kUnroll 16-byte loads in flight
// before it stores, so a block of a few hundred threads has tens of KiB outstanding: that, not
// arithmetic, is what gets a copy near the HBM limit. The host picks the block width from the
// segment size so small HND segments (one head of one block) do not leave most threads idle.
#include <cstdint>
#include <cuda_runtime.h>

namespace {

constexpr int kUnroll = 4;

__global__ void copy_segments(const uint64_t* __restrict__ table, int64_t n) {
  const uint64_t* src = table;
  const uint64_t* dst = table + n;
  const uint64_t* len = table + 2 * n;
  const uint64_t stride = blockDim.x;
  for (int64_t s = blockIdx.x; s < n; s += gridDim.x) {
    const uint64_t a = src[s], b = dst[s], nbytes = len[s];
    if (((a | b | nbytes) & 15u) == 0) {
      const uint4* s4 = reinterpret_cast<const uint4*>(a);
      uint4* d4 = reinterpret_cast<uint4*>(b);
      const uint64_t n16 = nbytes / 16;
      uint64_t i = threadIdx.x;
      for (; i + (kUnroll - 1) * stride < n16; i += kUnroll * stride) {
        uint4 r[kUnroll];
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) r[k] = __ldg(s4 + i + k * stride);
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) d4[i + k * stride] = r[k];
      }
      for (; i < n16; i += stride) d4[i] = __ldg(s4 + i);
    } else {
      const uint8_t* s1 = reinterpret_cast<const uint8_t*>(a);
      uint8_t* d1 = reinterpret_cast<uint8_t*>(b);
      for (uint64_t i = threadIdx.x; i < nbytes; i += stride) d1[i] = s1[i];
    }
  }
}

}  // namespace

// `table` is a device array of 3*n uint64: n source addresses, n destination addresses, n lengths.
// `threads` is the block width (a multiple of 32, at most 1024). Returns a cudaError_t (0 = success).
extern "C" int kvb_copy_segments_cuda(const uint64_t* table, int64_t n, int threads, void* stream) {
  if (n <= 0) return 0;
  if (threads < 32 || threads > 1024 || threads % 32 != 0) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t blocks = n < 1048576 ? n : 1048576;
  copy_segments<<<static_cast<unsigned int>(blocks), threads, 0, static_cast<cudaStream_t>(stream)>>>(table, n);
  return static_cast<int>(cudaGetLastError());
}
