"""The GPU pass script, dry run on the CPU: every step of both calls runs at tiny sizes, writes
into $OUT and reports ok, so a broken step is found here rather than in the minutes a GPU is lent."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("call", ["1", "2"])
def test_gpu_pass_dry_run(call, tmp_path):
    if shutil.which("timeout") is None:
        pytest.skip("the script bounds its steps with coreutils' timeout, absent here")
    env = dict(os.environ, OUT=str(tmp_path), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               GPU_PASS_BUDGET="900", SED_FAST_CACHE_DIR=os.environ.get("SED_FAST_CACHE_DIR", str(tmp_path / "c")))
    run = subprocess.run(["bash", "benchmarks/gpu_pass.sh", "--dry-run", call], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    status = (tmp_path / f"status{call}.txt").read_text()
    log = (tmp_path / f"log{call}.txt").read_text()
    assert run.returncode == 0, f"{status}\n{log[-6000:]}"
    assert "FAILED" not in status and "TIMED OUT" not in status, status
    assert json.loads((tmp_path / "env.json").read_text())["device"]
    expected = {"1": ["doctor", "e2e reference fp32", "e2e reference fp32 tf32", "e2e reference bf16 autocast",
                      "pytest cuda", "e2e fast fp32+bf16", "e2e fast bf16 cer8 kept32", "report"],
                "2": ["kernels", "resize vs PIL", "e2e reference torch.compile", "e2e batch 8",
                      "e2e SED-L", "video throughput", "train step", "export pt2 cuda", "report"]}[call]
    for step in expected:
        assert f"{step}: ok" in status, (step, status)
    assert len(list(tmp_path.iterdir())) <= 8 + 1, sorted(p.name for p in tmp_path.iterdir())  # + the cache
    rows = [json.loads(line) for line in (tmp_path / ("e2e.jsonl")).read_text().splitlines() if line.strip()]
    assert rows and all(r.get("valid") is not False for r in rows), [r.get("note") for r in rows]
