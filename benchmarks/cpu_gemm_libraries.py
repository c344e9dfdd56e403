"""The float32 matmuls of SED-B at the official 768 px input: PyTorch's CPU GEMM against ONNX Runtime's.

    python benchmarks/cpu_gemm_libraries.py [--threads 2] [--reps 5] [--out FILE.json]

On CPU, ONNX Runtime running the exported reference can beat every torch path; this shows whether
its GEMM (MLAS) is why. Each row is one ``linear`` shape of the model (ConvNeXt MLPs of the encoder
stages, the decoder's class-attention qkv and MLPs), timed as ``F.linear`` in torch (MKL in the
PyPI wheels) and as a one-node ONNX ``Gemm`` in ONNX Runtime on the same threads, medians after a
warm-up, outputs compared. Needs ``onnx`` and ``onnxruntime`` (``pip install -e ".[export]"``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from sed_fast.bench.common import environment

# (rows M, in K, out N, where): the 768 px encoder's stages (tokens 192^2 ... 24^2) and the
# decoder at 150 classes, per chunk of rows.
SHAPES = [
    (36864, 128, 512, "encoder stage 1 MLP in"), (36864, 512, 128, "encoder stage 1 MLP out"),
    (9216, 256, 1024, "encoder stage 2 MLP in"), (2304, 512, 2048, "encoder stage 3 MLP in"),
    (576, 1024, 4096, "encoder stage 4 MLP in"),
    (86400, 128, 384, "decoder1 class-attention qkv"), (32768, 32, 128, "decoder3 ConvNeXt MLP in"),
    (32768, 128, 32, "decoder3 ConvNeXt MLP out"),
]


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _ort_gemm(weight: torch.Tensor, bias: torch.Tensor, rows: int, threads: int):
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    out_features, in_features = weight.shape
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "weight", "bias"], ["y"], transB=1)], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, out_features])],
        initializer=[numpy_helper.from_array(weight.numpy(), "weight"), numpy_helper.from_array(bias.numpy(), "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    try:
        import onnxruntime
    except ImportError:
        parser.error('needs onnxruntime: pip install -e ".[export]"')
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'M':>6} {'K':>5} {'N':>5}  {'torch ms':>9} {'GFLOP/s':>8}  {'ORT ms':>8} {'GFLOP/s':>8}  ORT/torch  where")
    for m, k, n, where in SHAPES:
        x = torch.randn(m, k, generator=generator)
        weight = torch.randn(n, k, generator=generator) / k ** 0.5
        bias = torch.randn(n, generator=generator)
        session = _ort_gemm(weight, bias, m, args.threads)
        feed = {"x": x.numpy()}
        torch_ms = _median_ms(lambda: F.linear(x, weight, bias), args.reps)
        ort_ms = _median_ms(lambda: session.run(None, feed), args.reps)
        difference = (torch.from_numpy(session.run(None, feed)[0]) - F.linear(x, weight, bias)).abs().max().item()
        gflop = 2 * m * k * n / 1e9
        row = {"m": m, "k": k, "n": n, "where": where, "torch_ms": torch_ms, "ort_ms": ort_ms,
               "torch_gflop_per_s": gflop / torch_ms * 1e3, "ort_gflop_per_s": gflop / ort_ms * 1e3,
               "ort_speedup": torch_ms / ort_ms, "max_abs_diff": difference}
        rows.append(row)
        print(f"{m:>6} {k:>5} {n:>5}  {torch_ms:>9.1f} {row['torch_gflop_per_s']:>8.0f}  {ort_ms:>8.1f} "
              f"{row['ort_gflop_per_s']:>8.0f}  {row['ort_speedup']:>8.2f}x  {where}")
    result = dict(environment("cpu"), threads=args.threads, onnxruntime=onnxruntime.__version__,
                  torch_mkl=torch.backends.mkl.is_available(), rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
