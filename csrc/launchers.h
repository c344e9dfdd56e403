// Host launchers of the sed_fast CUDA kernels.
//
// The .cu files hold only kernels and these launchers; they include no torch headers besides
// c10's Half/BFloat16 (so nvcc compiles each in seconds, not minutes). ops.cpp does the tensor
// work: validation, allocation, the dtype dispatch, the stream, the TORCH_LIBRARY registration.
// Each launcher is explicitly instantiated for float, c10::Half and c10::BFloat16, enqueues its
// work on `stream` without synchronising, and returns cudaGetLastError() (or the first error).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace sed_fast {

// topk_union_reject.cu. aux: (B, T, HW) contiguous. kept: (B*T) bytes (zeroed here), flat_idx:
// (B*T) int32, class_offsets: (B+1) int32; every element of the three outputs is written.
// Requires 1 <= k, T >= 1, B*T < 2^31, B <= 65535.
template <typename scalar_t>
cudaError_t launch_topk_union_reject(const scalar_t* aux, uint8_t* kept, int32_t* flat_idx,
                                     int32_t* class_offsets, int64_t B, int64_t T, int64_t HW, int64_t k,
                                     cudaStream_t stream);

// dwconv_layernorm.cu. x: (N, H, W, C) contiguous (channels_last NCHW), aligned to 4 elements;
// dw_weight: (C, K*K) contiguous; dw_bias, ln_weight, ln_bias: (C,); y: (N, H, W, C).
// Supported: K == 9, C in {32, 64, 128} (dwconv_layernorm_supported tells).
bool dwconv_layernorm_supported(int64_t C, int64_t K);

template <typename scalar_t>
cudaError_t launch_dwconv_layernorm(const scalar_t* x, const scalar_t* dw_weight, const scalar_t* dw_bias,
                                    const scalar_t* ln_weight, const scalar_t* ln_bias, scalar_t* y,
                                    int64_t N, int64_t C, int64_t H, int64_t W, int64_t K, double eps,
                                    cudaStream_t stream);

}  // namespace sed_fast
