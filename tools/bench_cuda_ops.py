"""Time the CUDA-backend ops against their baselines on a GPU (run on the GPU machine).

    python tools/bench_cuda_ops.py                # both ops, fp32 and bf16
    python tools/bench_cuda_ops.py --op topk_union_reject --dtype bf16

topk_union_reject: the official rule (argsort + bincount + boolean index, which syncs with the host,
as the official code does), the torch reference, triton and cuda, at B=1, T in {150, 847},
24x24 and 48x48 (target: cuda >= 10x the official path).
dwconv_layernorm: PyTorch's depthwise conv + permute + LayerNorm, triton and cuda, C in {128, 64, 32}
at the decoder's sizes (target: cuda <= triton and >= 3x PyTorch).
Times are triton.testing.do_bench medians (ms, then us in the table), after a warm-up of every shape.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sed_fast.kernels import cuda_extension, dispatch  # noqa: E402,F401 - registers the cuda backend
from sed_fast.kernels.dwconv_layernorm import dwconv_layernorm  # noqa: E402
from sed_fast.kernels.topk_union_reject import topk_union_reject  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bench(fn, warmup=25, rep=200) -> float:
    import triton.testing
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e3  # us


def with_backend(op, backend, fn):
    def run():
        dispatch.set_backend(op, backend)
        try:
            return fn()
        finally:
            dispatch.set_backend(op, None)
    return run


def official_topk(aux, k):
    """SED's rule: argsort, the first k, bincount, > 0, then the kept indices (a host sync)."""
    classes = aux.shape[1]
    top = torch.argsort(aux, dim=1, descending=True)[:, :k].reshape(-1)
    keep = torch.bincount(top, minlength=classes) > 0
    return torch.arange(classes, device=aux.device)[keep]


def bench_topk(dtype, k=8):
    print(f"\ntopk_union_reject  dtype={dtype}  k={k}  (us)")
    print(f"{'shape':>20} {'official':>9} {'torch':>9} {'triton':>9} {'cuda':>9} {'speedup':>8}")
    for classes in (150, 847):
        for side in (24, 48):
            aux = torch.randn(1, classes, side, side, device="cuda", dtype=dtype)
            t = {"official": bench(lambda: official_topk(aux, k))}
            for backend in ("torch", "triton", "cuda"):
                fn = with_backend("topk_union_reject", backend, lambda: topk_union_reject(aux, k))
                # the model reads class_offsets[-1] once: include that sync, like the official path
                t[backend] = bench(lambda: fn()[2][-1].item())
            print(f"{f'1x{classes}x{side}x{side}':>20} {t['official']:9.1f} {t['torch']:9.1f} {t['triton']:9.1f} "
                  f"{t['cuda']:9.1f} {t['official'] / t['cuda']:7.1f}x")


def torch_dwconv_ln(x, w, b, g, beta, eps):
    y = F.conv2d(x, w, b, padding=w.shape[-1] // 2, groups=x.shape[1]).permute(0, 2, 3, 1)
    return F.layer_norm(y, (x.shape[1],), g, beta, eps)


def bench_dwconv(dtype):
    print(f"\ndwconv_layernorm  dtype={dtype}  (us)")
    print(f"{'shape (N,C,H,W)':>22} {'pytorch':>9} {'triton':>9} {'cuda':>9} {'vs torch':>9} {'vs triton':>9}")
    for n, c, side in ((150, 128, 24), (847, 128, 24), (150, 64, 48), (150, 32, 96), (8, 32, 192), (150, 128, 13)):
        x = torch.randn(n, c, side, side, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
        params = (torch.randn(c, 1, 9, 9, device="cuda", dtype=dtype) * 0.1, torch.randn(c, device="cuda", dtype=dtype),
                  torch.ones(c, device="cuda", dtype=dtype), torch.zeros(c, device="cuda", dtype=dtype))
        t = {"pytorch": bench(lambda: torch_dwconv_ln(x, *params, 1e-6))}
        for backend in ("triton", "cuda"):
            t[backend] = bench(with_backend("dwconv_layernorm", backend, lambda: dwconv_layernorm(x, *params, 1e-6)))
        print(f"{str((n, c, side, side)):>22} {t['pytorch']:9.1f} {t['triton']:9.1f} {t['cuda']:9.1f} "
              f"{t['pytorch'] / t['cuda']:8.2f}x {t['triton'] / t['cuda']:8.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=["all", "topk_union_reject", "dwconv_layernorm"], default="all")
    parser.add_argument("--dtype", choices=list(DTYPES) + ["all"], default="all")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    if not cuda_extension.load_extension():
        raise SystemExit(f"the CUDA extension is not available: {cuda_extension.load_error()}")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    dtypes = [DTYPES[args.dtype]] if args.dtype != "all" else [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        if args.op in ("all", "topk_union_reject"):
            bench_topk(dtype)
        if args.op in ("all", "dwconv_layernorm"):
            bench_dwconv(dtype)


if __name__ == "__main__":
    main()
