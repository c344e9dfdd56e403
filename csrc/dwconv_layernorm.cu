// dwconv_layernorm: ConvNeXt's depthwise KxK conv (padding K/2, groups=C, bias) fused with the
// LayerNorm over C at every pixel. x (N, C, H, W) channels_last -> y (N, H, W, C), fp32 math.
//
// Algorithm (persistent blocks of 128 threads, as many as fit on the GPU at once; each stages all
// K*K*C weights in shared memory as fp32 once, then loops over output tiles = TH x 8 pixels of one
// image, all C channels):
//   Channels go in chunks of CC (64, or 32 when C == 32). Per chunk the block stages the
//   (TH+K-1) x (8+K-1) x CC input patch (zero padded at the borders) in shared memory as fp32
//   (converted once). A group of CC/4 lanes owns one output row segment of R = 8 pixels; lane l
//   owns channels 4l..4l+3 of the chunk and accumulates 8 pixels x 4 channels in registers: per
//   filter row it reads 16 patch float4s and 9 weight float4s from shared memory for 288 FMAs
//   (16-byte accesses, a quarter warp reads 128 contiguous bytes: no bank conflicts). The
//   accumulators of every chunk stay in registers (C/CC x 32 floats), then the LayerNorm of each of
//   the 8 pixels takes two shuffle reductions over the group's lanes (mean, then the centred
//   variance) and the lanes store their 4 normalised channels (8- or 16-byte stores).
//   Configurations: C=128: CC=64, TH=8, 2 chunks (106 KB smem, 2 blocks/SM); C=64: CC=64, TH=8
//   (85 KB); C=32: CC=32, TH=16 (58 KB). K is a template parameter, instantiated for K=9.
//
// Memory traffic: x read once from DRAM plus the halo re-reads of neighbouring tiles (mostly L2
// hits: (TH+8)*16/(8*TH) = 3-4x the tile from L2), K*K*C weights per block (L2), y written once
// (N*H*W*C*elem). One launch on `stream`; no temporaries.
#include <atomic>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "launchers.h"

namespace sed_fast {
namespace {

constexpr int kR = 8;    // output pixels per thread (one row segment)
constexpr int kTW = 8;   // tile width = one segment
constexpr int kThreads = 128;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(c10::Half v) {
  return __half2float(*reinterpret_cast<const __half*>(&v));
}
__device__ __forceinline__ float to_float(c10::BFloat16 v) {
  return __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(&v));
}

// 4 consecutive elements (16-byte aligned for fp32, 8-byte for 16-bit types) as a float4.
__device__ __forceinline__ float4 load4(const float* p) { return __ldg(reinterpret_cast<const float4*>(p)); }
__device__ __forceinline__ float4 load4(const c10::Half* p) {
  const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&u.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
  return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ float4 load4(const c10::BFloat16* p) {
  const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
  return make_float4(a.x, a.y, b.x, b.y);
}

__device__ __forceinline__ void store4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
__device__ __forceinline__ void store4(c10::Half* p, float4 v) {
  const __half2 a = __floats2half2_rn(v.x, v.y);
  const __half2 b = __floats2half2_rn(v.z, v.w);
  uint2 u;
  u.x = *reinterpret_cast<const uint32_t*>(&a);
  u.y = *reinterpret_cast<const uint32_t*>(&b);
  *reinterpret_cast<uint2*>(p) = u;
}
__device__ __forceinline__ void store4(c10::BFloat16* p, float4 v) {
  const __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y);
  const __nv_bfloat162 b = __floats2bfloat162_rn(v.z, v.w);
  uint2 u;
  u.x = *reinterpret_cast<const uint32_t*>(&a);
  u.y = *reinterpret_cast<const uint32_t*>(&b);
  *reinterpret_cast<uint2*>(p) = u;
}

template <typename scalar_t>
__device__ __forceinline__ float4 load4_scalar(const scalar_t* p) {
  return make_float4(to_float(p[0]), to_float(p[1]), to_float(p[2]), to_float(p[3]));
}

__device__ __forceinline__ void fma4(float4& acc, const float4 a, const float4 b) {
  acc.x = fmaf(a.x, b.x, acc.x);
  acc.y = fmaf(a.y, b.y, acc.y);
  acc.z = fmaf(a.z, b.z, acc.z);
  acc.w = fmaf(a.w, b.w, acc.w);
}

template <int C, int K>
struct Config {
  static constexpr int CC = C >= 64 ? 64 : C;     // channels per chunk
  static constexpr int NCHUNK = C / CC;
  static constexpr int LG = CC / 4;               // lanes per pixel group (one float4 each)
  static constexpr int TH = kThreads / LG;        // tile rows = segments = groups per block
  static constexpr int PH = TH + K - 1;
  static constexpr int PW = kTW + K - 1;
  static constexpr int kPatchVec = PH * PW * LG;  // float4s: one chunk's input patch
  static constexpr int kWeightVec = K * K * C / 4;  // float4s: all weights, [chunk][tap][LG]
  static constexpr size_t kSmemBytes = static_cast<size_t>(kPatchVec + kWeightVec) * sizeof(float4);
  static_assert(C % CC == 0 && CC % 4 == 0 && LG <= 32 && 32 % LG == 0, "bad channel configuration");
  static_assert(NCHUNK <= 2, "accumulators for more than 2 chunks would spill");
};

// Persistent blocks: each stages the weights once, then loops over output tiles (tile ids
// blockIdx.x, blockIdx.x + gridDim.x, ...; a tile = one image n and a TH x 8 pixel window).
template <typename scalar_t, int C, int K>
__global__ void __launch_bounds__(kThreads, 2)
dwconv_layernorm_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dw_weight,
                        const scalar_t* __restrict__ dw_bias, const scalar_t* __restrict__ ln_weight,
                        const scalar_t* __restrict__ ln_bias, scalar_t* __restrict__ y, int H, int W,
                        int tiles_x, int tiles_per_image, int64_t num_tiles, float eps) {
  using Cfg = Config<C, K>;
  constexpr int CC = Cfg::CC, LG = Cfg::LG, TH = Cfg::TH, PW = Cfg::PW, NCHUNK = Cfg::NCHUNK;
  constexpr int PAD = K / 2;
  constexpr int KK = K * K;

  extern __shared__ float4 smem[];
  float4* patch = smem;                    // [PH][PW][LG], one chunk
  float4* wsm = smem + Cfg::kPatchVec;     // [NCHUNK][K*K][LG]

  const int tid = threadIdx.x;
  const int lc = tid % LG;   // this lane's channel vector within a chunk
  const int seg = tid / LG;  // this thread's row in the tile

  // Weights, transposed to [chunk][tap][channel] fp32, once per block (the reads are strided by
  // K*K, but L1/L2 serve them and a block then runs many tiles). The first loop iteration's
  // __syncthreads orders these stores before any read.
  {
    float* wsm_f = reinterpret_cast<float*>(wsm);
    for (int i = tid; i < KK * C; i += kThreads) {
      const int chunk = i / (KK * CC), rem = i % (KK * CC);
      const int tap = rem / CC, c = rem % CC;
      wsm_f[i] = to_float(dw_weight[(chunk * CC + c) * KK + tap]);
    }
  }
  float4 bias[NCHUNK], gamma[NCHUNK], beta[NCHUNK];
#pragma unroll
  for (int chunk = 0; chunk < NCHUNK; ++chunk) {
    bias[chunk] = load4_scalar(dw_bias + chunk * CC + lc * 4);
    gamma[chunk] = load4_scalar(ln_weight + chunk * CC + lc * 4);
    beta[chunk] = load4_scalar(ln_bias + chunk * CC + lc * 4);
  }
  constexpr float inv_c = 1.0f / C;

  for (int64_t tile_id = blockIdx.x; tile_id < num_tiles; tile_id += gridDim.x) {
    const int64_t n = tile_id / tiles_per_image;
    const int tile = static_cast<int>(tile_id % tiles_per_image);
    const int y0 = (tile / tiles_x) * TH;
    const int x0 = (tile % tiles_x) * kTW;
    const scalar_t* x_n = x + n * H * W * static_cast<int64_t>(C);

    float4 acc[NCHUNK][kR];
#pragma unroll
    for (int chunk = 0; chunk < NCHUNK; ++chunk) {
      __syncthreads();  // the patch is no longer read (previous chunk / tile); weights are staged
      // Stage the zero-padded input patch of this chunk (coalesced along C).
#pragma unroll 4
      for (int i = tid; i < Cfg::kPatchVec; i += kThreads) {
        const int pos = i / LG, cv = i % LG;
        const int gy = y0 + pos / PW - PAD;
        const int gx = x0 + pos % PW - PAD;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (gy >= 0 && gy < H && gx >= 0 && gx < W) {
          v = load4(x_n + (static_cast<int64_t>(gy) * W + gx) * C + chunk * CC + cv * 4);
        }
        patch[i] = v;
      }
      __syncthreads();

#pragma unroll
      for (int r = 0; r < kR; ++r) acc[chunk][r] = bias[chunk];
      const float4* wchunk = wsm + chunk * KK * LG + lc;
#pragma unroll 1
      for (int ky = 0; ky < K; ++ky) {
        float4 wv[K];
#pragma unroll
        for (int kx = 0; kx < K; ++kx) wv[kx] = wchunk[(ky * K + kx) * LG];
        const float4* row = patch + (seg + ky) * PW * LG + lc;
#pragma unroll
        for (int j = 0; j < PW; ++j) {
          const float4 in = row[j * LG];
#pragma unroll
          for (int r = 0; r < kR; ++r) {
            const int kx = j - r;
            if (kx >= 0 && kx < K) fma4(acc[chunk][r], in, wv[kx]);
          }
        }
      }
    }

    // LayerNorm over C of each of the 8 pixels: reductions over the LG lanes of the group.
    const int oy = y0 + seg;
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      float s = 0.f;
#pragma unroll
      for (int chunk = 0; chunk < NCHUNK; ++chunk) {
        const float4 a = acc[chunk][r];
        s += (a.x + a.y) + (a.z + a.w);
      }
#pragma unroll
      for (int off = 1; off < LG; off <<= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      const float mean = s * inv_c;
      float q = 0.f;
#pragma unroll
      for (int chunk = 0; chunk < NCHUNK; ++chunk) {
        const float4 a = acc[chunk][r];
        const float dx = a.x - mean, dy = a.y - mean, dz = a.z - mean, dw = a.w - mean;
        q += (dx * dx + dy * dy) + (dz * dz + dw * dw);
      }
#pragma unroll
      for (int off = 1; off < LG; off <<= 1) q += __shfl_xor_sync(0xffffffffu, q, off);
      const float rstd = rsqrtf(q * inv_c + eps);
      const int ox = x0 + r;
      if (oy < H && ox < W) {
        scalar_t* dst = y + ((n * H + oy) * W + ox) * static_cast<int64_t>(C) + lc * 4;
#pragma unroll
        for (int chunk = 0; chunk < NCHUNK; ++chunk) {
          const float4 a = acc[chunk][r];
          float4 o;
          o.x = (a.x - mean) * rstd * gamma[chunk].x + beta[chunk].x;
          o.y = (a.y - mean) * rstd * gamma[chunk].y + beta[chunk].y;
          o.z = (a.z - mean) * rstd * gamma[chunk].z + beta[chunk].z;
          o.w = (a.w - mean) * rstd * gamma[chunk].w + beta[chunk].w;
          store4(dst + chunk * CC, o);
        }
      }
    }
  }
}

// Per device and instantiation, once: the shared-memory opt-in (> 48 KB) and the number of
// resident blocks (the persistent grid size). Atomic because host threads may launch concurrently:
// a thread must never see "ready" before the limit itself (a grid of 0 would fail the launch).
// Two threads racing both do the set-up, which is idempotent.
struct LaunchInfo {
  std::atomic<int> grid_limit{0};  // 0: not set up yet
};

template <typename scalar_t, int C, int K>
cudaError_t launch(const scalar_t* x, const scalar_t* w, const scalar_t* wb, const scalar_t* g,
                   const scalar_t* b, scalar_t* y, int64_t N, int64_t H, int64_t W, double eps,
                   cudaStream_t stream) {
  using Cfg = Config<C, K>;
  auto kernel = dwconv_layernorm_kernel<scalar_t, C, K>;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  static LaunchInfo info[64];
  LaunchInfo local;
  LaunchInfo& li = device < 64 ? info[device] : local;
  int grid_limit = li.grid_limit.load(std::memory_order_acquire);
  if (grid_limit == 0) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(Cfg::kSmemBytes));
    if (err != cudaSuccess) return err;
    int per_sm = 0, sms = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, Cfg::kSmemBytes);
    if (err != cudaSuccess) return err;
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
    grid_limit = (per_sm > 0 ? per_sm : 1) * (sms > 0 ? sms : 1);
    li.grid_limit.store(grid_limit, std::memory_order_release);
  }
  const int64_t tiles_x = (W + kTW - 1) / kTW;
  const int64_t tiles_y = (H + Cfg::TH - 1) / Cfg::TH;
  const int64_t num_tiles = N * tiles_x * tiles_y;
  if (num_tiles == 0) return cudaSuccess;
  const int64_t grid = num_tiles < grid_limit ? num_tiles : grid_limit;
  kernel<<<static_cast<unsigned>(grid), kThreads, Cfg::kSmemBytes, stream>>>(
      x, w, wb, g, b, y, static_cast<int>(H), static_cast<int>(W), static_cast<int>(tiles_x),
      static_cast<int>(tiles_x * tiles_y), num_tiles, static_cast<float>(eps));
  return cudaGetLastError();
}

}  // namespace

bool dwconv_layernorm_supported(int64_t C, int64_t K) {
  return K == 9 && (C == 32 || C == 64 || C == 128);
}

template <typename scalar_t>
cudaError_t launch_dwconv_layernorm(const scalar_t* x, const scalar_t* dw_weight, const scalar_t* dw_bias,
                                    const scalar_t* ln_weight, const scalar_t* ln_bias, scalar_t* y,
                                    int64_t N, int64_t C, int64_t H, int64_t W, int64_t K, double eps,
                                    cudaStream_t stream) {
  if (K != 9) return cudaErrorInvalidValue;
  switch (C) {
    case 32: return launch<scalar_t, 32, 9>(x, dw_weight, dw_bias, ln_weight, ln_bias, y, N, H, W, eps, stream);
    case 64: return launch<scalar_t, 64, 9>(x, dw_weight, dw_bias, ln_weight, ln_bias, y, N, H, W, eps, stream);
    case 128: return launch<scalar_t, 128, 9>(x, dw_weight, dw_bias, ln_weight, ln_bias, y, N, H, W, eps, stream);
    default: return cudaErrorInvalidValue;
  }
}

template cudaError_t launch_dwconv_layernorm<float>(const float*, const float*, const float*, const float*,
                                                    const float*, float*, int64_t, int64_t, int64_t, int64_t,
                                                    int64_t, double, cudaStream_t);
template cudaError_t launch_dwconv_layernorm<c10::Half>(const c10::Half*, const c10::Half*, const c10::Half*,
                                                        const c10::Half*, const c10::Half*, c10::Half*, int64_t,
                                                        int64_t, int64_t, int64_t, int64_t, double, cudaStream_t);
template cudaError_t launch_dwconv_layernorm<c10::BFloat16>(const c10::BFloat16*, const c10::BFloat16*,
                                                            const c10::BFloat16*, const c10::BFloat16*,
                                                            const c10::BFloat16*, c10::BFloat16*, int64_t,
                                                            int64_t, int64_t, int64_t, int64_t, double,
                                                            cudaStream_t);

}  // namespace sed_fast
