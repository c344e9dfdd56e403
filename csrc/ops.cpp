// Tensor-level entry points and the TORCH_LIBRARY registration of the sed_fast_cuda ops.
//
//   torch.ops.sed_fast_cuda.topk_union_reject(Tensor aux_logits, int k) -> (Tensor, Tensor, Tensor)
//   torch.ops.sed_fast_cuda.dwconv_layernorm(Tensor x, Tensor dw_weight, Tensor dw_bias,
//                                            Tensor ln_weight, Tensor ln_bias, float eps) -> Tensor
//
// Only CUDA kernels are registered here; the fake (meta) kernels live in Python
// (sed_fast/kernels/cuda_extension.py, named by set_python_module) so torch.compile can trace the ops.
// Everything runs on at::cuda::getCurrentCUDAStream(), so CUDA graphs capture it.
#include <Python.h>

#include <cstdint>
#include <tuple>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launchers.h"

namespace sed_fast {
namespace {

// AT_DISPATCH over exactly the three dtypes the kernels are instantiated for (no double).
#define SED_FAST_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)               \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                       \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)          \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)           \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_union_reject_cuda(const at::Tensor& aux_logits, int64_t k) {
  TORCH_CHECK(aux_logits.is_cuda(), "sed_fast_cuda::topk_union_reject: aux_logits must be a CUDA tensor, got ",
              aux_logits.device());
  TORCH_CHECK(aux_logits.dim() == 4, "sed_fast_cuda::topk_union_reject: aux_logits must be (B, T, h, w), got ",
              aux_logits.dim(), " dims with shape ", aux_logits.sizes());
  TORCH_CHECK(is_float_type(aux_logits.scalar_type()),
              "sed_fast_cuda::topk_union_reject: aux_logits must be float32, float16 or bfloat16, got ",
              aux_logits.scalar_type());
  TORCH_CHECK(k >= 1, "sed_fast_cuda::topk_union_reject: k must be >= 1, got ", k);
  const int64_t B = aux_logits.size(0), T = aux_logits.size(1);
  const int64_t HW = aux_logits.size(2) * aux_logits.size(3);
  TORCH_CHECK(T >= 1, "sed_fast_cuda::topk_union_reject: the class dimension T must be >= 1 (got T = 0)");
  TORCH_CHECK(B <= 65535, "sed_fast_cuda::topk_union_reject: at most 65535 images per call, got ", B);
  TORCH_CHECK(B * T < (int64_t{1} << 31), "sed_fast_cuda::topk_union_reject: B*T = ", B * T,
              " does not fit the int32 flat indices");

  const c10::cuda::CUDAGuard guard(aux_logits.device());
  const at::Tensor aux = aux_logits.contiguous();
  const auto opts = aux.options();
  at::Tensor kept = at::empty({B, T}, opts.dtype(at::kBool));
  at::Tensor flat_idx = at::empty({B * T}, opts.dtype(at::kInt));
  at::Tensor offsets = at::empty({B + 1}, opts.dtype(at::kInt));
  // c10::cuda::getCurrentCUDAStream is at::cuda::getCurrentCUDAStream (ATen/cuda/CUDAContext.h
  // would also pull in the cuSPARSE/cuBLAS headers, which a minimal toolkit lacks).
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SED_FAST_DISPATCH_FLOAT_HALF_BF16(aux.scalar_type(), "sed_fast_topk_union_reject", [&] {
    C10_CUDA_CHECK(launch_topk_union_reject<scalar_t>(
        aux.const_data_ptr<scalar_t>(), reinterpret_cast<uint8_t*>(kept.mutable_data_ptr<bool>()),
        flat_idx.mutable_data_ptr<int32_t>(), offsets.mutable_data_ptr<int32_t>(), B, T, HW, k, stream));
  });
  return {kept, flat_idx, offsets};
}

at::Tensor dwconv_layernorm_cuda(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& dw_bias,
                                 const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps) {
  constexpr const char* op = "sed_fast_cuda::dwconv_layernorm";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, op, ": x must be (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(is_float_type(x.scalar_type()), op, ": x must be float32, float16 or bfloat16, got ",
              x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(dw_weight.dim() == 4 && dw_weight.size(0) == C && dw_weight.size(1) == 1 &&
                  dw_weight.size(2) == dw_weight.size(3) && dw_weight.size(2) % 2 == 1,
              op, ": dw_weight must be (C, 1, K, K) with K odd and C = ", C, ", got ", dw_weight.sizes());
  const int64_t K = dw_weight.size(2);
  TORCH_CHECK(dw_bias.dim() == 1 && dw_bias.size(0) == C, op, ": dw_bias must be (", C, ",), got ",
              dw_bias.sizes());
  TORCH_CHECK(ln_weight.dim() == 1 && ln_weight.size(0) == C, op, ": ln_weight must be (", C, ",), got ",
              ln_weight.sizes());
  TORCH_CHECK(ln_bias.dim() == 1 && ln_bias.size(0) == C, op, ": ln_bias must be (", C, ",), got ",
              ln_bias.sizes());
  for (const at::Tensor* t : {&dw_weight, &dw_bias, &ln_weight, &ln_bias}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": parameters must have x's dtype ", x.scalar_type(),
                ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), op, ": parameters must be on ", x.device(), ", got ", t->device());
  }
  TORCH_CHECK(dwconv_layernorm_supported(C, K), op, ": the CUDA kernel supports K = 9 and C in {32, 64, 128}, "
              "got K = ", K, ", C = ", C, " (use the triton or torch backend)");
  TORCH_CHECK(N * H * W * C < (int64_t{1} << 62) && H * W < (int64_t{1} << 31), op, ": tensor too large");
  TORCH_CHECK(N * ((H + 7) / 8) * ((W + 7) / 8) < (int64_t{1} << 31), op, ": too many tiles");

  const c10::cuda::CUDAGuard guard(x.device());
  // channels_last (N, C, H, W) is (N, H, W, C) in memory (row slices x[a:b] of it too); an NCHW
  // input is converted (one copy). The kernel loads 4 channels at once: the base must be aligned
  // to 4 elements (16 bytes fp32, 8 bytes fp16/bf16); a misaligned storage offset costs a copy.
  at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  if (reinterpret_cast<uintptr_t>(xc.const_data_ptr()) % (4 * xc.element_size()) != 0) {
    xc = xc.clone(at::MemoryFormat::ChannelsLast);
  }
  const at::Tensor w = dw_weight.contiguous();
  const at::Tensor wb = dw_bias.contiguous();
  const at::Tensor g = ln_weight.contiguous();
  const at::Tensor b = ln_bias.contiguous();
  at::Tensor y = at::empty({N, H, W, C}, x.options());
  if (y.numel() == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SED_FAST_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "sed_fast_dwconv_layernorm", [&] {
    C10_CUDA_CHECK(launch_dwconv_layernorm<scalar_t>(
        xc.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), wb.const_data_ptr<scalar_t>(),
        g.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), N, C, H, W,
        K, eps, stream));
  });
  return y;
}

}  // namespace
}  // namespace sed_fast

TORCH_LIBRARY(sed_fast_cuda, m) {
  m.set_python_module("sed_fast.kernels.cuda_extension");
  m.def("topk_union_reject(Tensor aux_logits, int k) -> (Tensor, Tensor, Tensor)");
  m.def("dwconv_layernorm(Tensor x, Tensor dw_weight, Tensor dw_bias, Tensor ln_weight, Tensor ln_bias, "
        "float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(sed_fast_cuda, CUDA, m) {
  m.impl("topk_union_reject", &sed_fast::topk_union_reject_cuda);
  m.impl("dwconv_layernorm", &sed_fast::dwconv_layernorm_cuda);
}

// A Python module init so that `import sed_fast._C` (setup.py build) loads the library and runs
// the registrations above; the JIT build loads it with torch.ops.load_library instead.
#define SED_FAST_CONCAT_(a, b) a##b
#define SED_FAST_CONCAT(a, b) SED_FAST_CONCAT_(a, b)
#define SED_FAST_STR_(a) #a
#define SED_FAST_STR(a) SED_FAST_STR_(a)
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

PyMODINIT_FUNC SED_FAST_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, SED_FAST_STR(TORCH_EXTENSION_NAME),
                                   "sed_fast CUDA kernels (ops registered under torch.ops.sed_fast_cuda)",
                                   -1, nullptr};
  return PyModule_Create(&module_def);
}
