// topk_union_reject: category early rejection (CER) of SED on the device, no host round trip.
//
// Semantics (same as sed_fast.kernels.topk_union_reject.topk_union_reject_reference):
//   aux (B, T, h, w). At each pixel of image b, class t is kept iff aux[b, t, pixel] >= the k-th
//   largest present logit of that pixel (k clamped to T; ties at the k-th place keep every tied
//   class). -inf and NaN mark absent classes: never kept, and they take no top-k place, so a pixel
//   with fewer than k present logits keeps all of them. +inf is an ordinary, largest value.
//   kept[b, t] = OR over pixels.  flat_idx = the kept b*T + t in ascending order, then -1.
//   class_offsets[b] = number of kept classes of images < b (exclusive prefix sum, B+1 entries).
//
// Kernel 1, topk_mark_kernel (grid: pixel tiles x B, 256 threads):
//   A group of G lanes (G = 1..32, chosen on the host to fill the GPU) owns one pixel; lane s of
//   the group reads classes t = s, s+G, ... (the P = 32/G pixels of a warp are adjacent, so each
//   load instruction reads P consecutive logits of G class planes). Each lane keeps its KMAX
//   largest keys in a sorted register list (KMAX = 2, 8 or 32 >= k; a branch-free insertion).
//   The group then pops k times: a shuffle max over the G list heads, the lowest owning lane
//   shifts its list; the k-th popped key is the threshold (multiplicity counted, so ties are
//   exact). A second pass over the same logits (L1/L2 hits) stores kept[b, t] = 1 (plain,
//   idempotent byte stores; the mask is zeroed by a memset first).
//   k > 32 uses topk_mark_radix_kernel: the k-th largest key by a 32-step MSB-first bit
//   selection (each step counts, over the group, the keys matching the prefix with that bit set).
//   Keys are order-preserving uint32 images of the fp32 value (-0 -> +0); absent values (-inf,
//   NaN) get key 0, below every present key, which also pads the register lists: a threshold of
//   0 (fewer than k present) keeps every present class.
// Kernel 2, topk_compact_kernel (1 block of 1024 threads): a cub::BlockScan over the flat B*T
//   mask in chunks of 4096 writes flat_idx (stable compaction), the -1 tail and class_offsets
//   (offset of image b = exclusive prefix at position b*T; offsets[B] = total).
//
// Memory traffic: logits read twice (B*T*h*w*elem; the second read mostly from L1/L2), B*T bytes
// memset + written (a few of them) + read once, 4*B*T + 4*(B+1) bytes written. Launches: memset
// + 2 kernels, all on `stream` (CUDA-graph capturable).
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "launchers.h"

namespace sed_fast {
namespace {

constexpr int kMarkThreads = 256;
constexpr int kScanThreads = 1024;
constexpr int kScanItems = 4;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(c10::Half v) {
  return __half2float(*reinterpret_cast<const __half*>(&v));
}
__device__ __forceinline__ float to_float(c10::BFloat16 v) {
  return __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(&v));
}

// Order-preserving map of the present values float -> uint32 (a < b  <=>  key(a) < key(b)); -0
// and +0 share a key. Absent values (-inf, NaN) map to 0, below every present key (the smallest,
// -FLT_MAX, has key 0x00800000); 0 also pads the register lists.
__device__ __forceinline__ uint32_t float_key(float v) {
  if (!(v > -INFINITY)) return 0u;  // -inf and NaN: absent
  if (v == 0.0f) return 0x80000000u;
  const uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The keep test of the reference: present and >= the threshold (the k-th largest present key, or
// 0 when the pixel has fewer than k present classes, which then keeps all of them).
__device__ __forceinline__ bool keep_test(uint32_t key, uint32_t thr) { return key != 0u && key >= thr; }

// Insert x into the descending list L (KMAX largest so far).
template <int KMAX>
__device__ __forceinline__ void list_insert(uint32_t (&L)[KMAX], uint32_t x) {
  if (x > L[KMAX - 1]) {
#pragma unroll
    for (int i = KMAX - 1; i > 0; --i) {
      L[i] = (x > L[i - 1]) ? L[i - 1] : max(L[i], x);
    }
    L[0] = max(L[0], x);
  }
}

struct PixelLanes {
  int slice;     // index of this lane in its pixel's group, 0..G-1
  int group;     // G, lanes per pixel
  int pix_bits;  // log2(P): group lanes differ in lane bits >= pix_bits
  int64_t pixel;
  bool active;
};

__device__ __forceinline__ PixelLanes pixel_lanes(int log2_group, int64_t HW) {
  PixelLanes p;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  p.pix_bits = 5 - log2_group;
  p.group = 1 << log2_group;
  const int P = 1 << p.pix_bits;
  p.slice = lane >> p.pix_bits;
  p.pixel = (static_cast<int64_t>(blockIdx.x) * (kMarkThreads / 32) + warp) * P + (lane & (P - 1));
  p.active = p.pixel < HW;
  return p;
}

__device__ __forceinline__ uint32_t group_max(uint32_t v, int pix_bits) {
  for (int off = 1 << pix_bits; off < 32; off <<= 1) v = max(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}
__device__ __forceinline__ int group_min(int v, int pix_bits) {
  for (int off = 1 << pix_bits; off < 32; off <<= 1) v = min(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}
__device__ __forceinline__ int group_sum(int v, int pix_bits) {
  for (int off = 1 << pix_bits; off < 32; off <<= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

template <typename scalar_t>
__device__ __forceinline__ void mark_kept(const scalar_t* __restrict__ src, uint8_t* __restrict__ kept_b,
                                          const PixelLanes& p, int64_t T, int64_t HW, uint32_t thr) {
  if (!p.active) return;
  for (int64_t t = p.slice; t < T; t += p.group) {
    if (keep_test(float_key(to_float(src[t * HW])), thr)) kept_b[t] = 1;
  }
}

// Kernel 1 (k <= KMAX <= 32). All lanes stay alive to the end of the shuffles.
template <typename scalar_t, int KMAX>
__global__ void __launch_bounds__(kMarkThreads)
topk_mark_kernel(const scalar_t* __restrict__ aux, uint8_t* __restrict__ kept, int64_t T, int64_t HW,
                 int k, int log2_group) {
  const PixelLanes p = pixel_lanes(log2_group, HW);
  const int64_t b = blockIdx.y;
  const scalar_t* src = aux + b * T * HW + (p.active ? p.pixel : 0);

  uint32_t L[KMAX];
#pragma unroll
  for (int i = 0; i < KMAX; ++i) L[i] = 0u;

  if (p.active) {
    const int64_t G = p.group;
    int64_t t = p.slice;
    // Four independent loads in flight before the inserts use them.
    for (; t + 3 * G < T; t += 4 * G) {
      const float v0 = to_float(src[t * HW]);
      const float v1 = to_float(src[(t + G) * HW]);
      const float v2 = to_float(src[(t + 2 * G) * HW]);
      const float v3 = to_float(src[(t + 3 * G) * HW]);
      list_insert(L, float_key(v0));
      list_insert(L, float_key(v1));
      list_insert(L, float_key(v2));
      list_insert(L, float_key(v3));
    }
    for (; t < T; t += G) list_insert(L, float_key(to_float(src[t * HW])));
  }

  // k pops over the group: the k-th popped key is the k-th largest of the pixel.
  uint32_t thr = 0u;
  for (int round = 0; round < k; ++round) {
    const uint32_t head = L[0];
    const uint32_t m = group_max(head, p.pix_bits);
    const int owner = group_min(head == m ? p.slice : p.group, p.pix_bits);
    if (owner == p.slice) {
#pragma unroll
      for (int i = 0; i < KMAX - 1; ++i) L[i] = L[i + 1];
      L[KMAX - 1] = 0u;
    }
    thr = m;
  }
  mark_kept(src, kept + b * T, p, T, HW, thr);
}

// Kernel 1 for k > 32: MSB-first radix selection of the k-th largest key (32 counting passes).
template <typename scalar_t>
__global__ void __launch_bounds__(kMarkThreads)
topk_mark_radix_kernel(const scalar_t* __restrict__ aux, uint8_t* __restrict__ kept, int64_t T, int64_t HW,
                       int k, int log2_group) {
  const PixelLanes p = pixel_lanes(log2_group, HW);
  const int64_t b = blockIdx.y;
  const scalar_t* src = aux + b * T * HW + (p.active ? p.pixel : 0);

  uint32_t prefix = 0u, mask = 0u;
  int rank = k;  // rank of the wanted key among the keys that match `prefix` on `mask`
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t bitv = 1u << bit;
    int count = 0;
    if (p.active) {
      for (int64_t t = p.slice; t < T; t += p.group) {
        const uint32_t key = float_key(to_float(src[t * HW]));
        count += ((key & mask) == prefix && (key & bitv)) ? 1 : 0;
      }
    }
    count = group_sum(count, p.pix_bits);
    if (count >= rank) {
      prefix |= bitv;
    } else {
      rank -= count;
    }
    mask |= bitv;
  }
  mark_kept(src, kept + b * T, p, T, HW, prefix);
}

// Kernel 2: stable compaction of the flat mask, -1 tail, per-image offsets.
__global__ void __launch_bounds__(kScanThreads)
topk_compact_kernel(const uint8_t* __restrict__ kept, int32_t* __restrict__ flat_idx,
                    int32_t* __restrict__ offsets, int64_t B, int64_t T) {
  using BlockScan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename BlockScan::TempStorage temp;
  const int64_t n = B * T;
  int carry = 0;  // kept count before this chunk, the same in every thread
  for (int64_t base = 0; base < n; base += kScanThreads * kScanItems) {
    const int64_t i0 = base + static_cast<int64_t>(threadIdx.x) * kScanItems;
    bool flag[kScanItems];
    int count = 0;
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) {
      flag[j] = (i0 + j < n) && kept[i0 + j] != 0;
      count += flag[j] ? 1 : 0;
    }
    int exclusive = 0, total = 0;
    BlockScan(temp).ExclusiveSum(count, exclusive, total);
    int pos = carry + exclusive;
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) {
      const int64_t i = i0 + j;
      if (i < n) {
        if (i % T == 0) offsets[i / T] = pos;
        if (flag[j]) flat_idx[pos++] = static_cast<int32_t>(i);
      }
    }
    carry += total;
    __syncthreads();  // temp is reused by the next chunk's scan
  }
  for (int64_t i = carry + threadIdx.x; i < n; i += kScanThreads) flat_idx[i] = -1;
  if (threadIdx.x == 0) offsets[B] = carry;
}

// Lanes per pixel: enough threads to fill the GPU (~16K), at most 32, at most T (rounded down to
// a power of two), and at least 4 when T allows (so a warp reads <= 8 adjacent pixels per load).
int choose_log2_group(int64_t B, int64_t T, int64_t HW) {
  const int64_t pixels = B * HW;
  int lg = 0;
  while (lg < 5 && pixels * (int64_t{1} << lg) < 16384) ++lg;
  if (lg < 2) lg = 2;
  while (lg > 0 && (int64_t{1} << lg) > T) --lg;
  return lg;
}

template <typename scalar_t, int KMAX>
void launch_mark(const scalar_t* aux, uint8_t* kept, int64_t B, int64_t T, int64_t HW, int k, int lg,
                 dim3 grid, cudaStream_t stream) {
  topk_mark_kernel<scalar_t, KMAX><<<grid, kMarkThreads, 0, stream>>>(aux, kept, T, HW, k, lg);
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_topk_union_reject(const scalar_t* aux, uint8_t* kept, int32_t* flat_idx,
                                     int32_t* class_offsets, int64_t B, int64_t T, int64_t HW, int64_t k,
                                     cudaStream_t stream) {
  const int64_t n = B * T;
  if (n > 0) {
    cudaError_t err = cudaMemsetAsync(kept, 0, static_cast<size_t>(n), stream);
    if (err != cudaSuccess) return err;
  }
  const int kk = static_cast<int>(k < T ? k : T);
  if (n > 0 && HW > 0) {
    const int lg = choose_log2_group(B, T, HW);
    const int64_t pixels_per_block = static_cast<int64_t>(kMarkThreads / 32) * (32 >> lg);
    const dim3 grid(static_cast<unsigned>((HW + pixels_per_block - 1) / pixels_per_block),
                    static_cast<unsigned>(B));
    if (kk <= 2) {
      launch_mark<scalar_t, 2>(aux, kept, B, T, HW, kk, lg, grid, stream);
    } else if (kk <= 8) {
      launch_mark<scalar_t, 8>(aux, kept, B, T, HW, kk, lg, grid, stream);
    } else if (kk <= 32) {
      launch_mark<scalar_t, 32>(aux, kept, B, T, HW, kk, lg, grid, stream);
    } else {
      topk_mark_radix_kernel<scalar_t><<<grid, kMarkThreads, 0, stream>>>(aux, kept, T, HW, kk, lg);
    }
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  topk_compact_kernel<<<1, kScanThreads, 0, stream>>>(kept, flat_idx, class_offsets, B, T);
  return cudaGetLastError();
}

template cudaError_t launch_topk_union_reject<float>(const float*, uint8_t*, int32_t*, int32_t*, int64_t,
                                                     int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t launch_topk_union_reject<c10::Half>(const c10::Half*, uint8_t*, int32_t*, int32_t*,
                                                         int64_t, int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t launch_topk_union_reject<c10::BFloat16>(const c10::BFloat16*, uint8_t*, int32_t*,
                                                             int32_t*, int64_t, int64_t, int64_t, int64_t,
                                                             cudaStream_t);

}  // namespace sed_fast
