"""What a new user meets first: help texts, messages, the Python defaults and helpers (issue 23)."""
import contextlib
import io
import subprocess
import sys
import textwrap

from sed_fast import cli


def run_main(argv):
    """``sed-fast ...`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_bench_kernels_help_names_the_command():
    code, out, _ = run_main(["bench-kernels", "--help"])
    assert code == 0 and out.startswith("usage: sed-fast bench-kernels")


def test_video_files_in_an_image_folder_are_reported(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    for name in ("clip.mp4", "take2.MOV"):
        (tmp_path / name).write_bytes(b"\0" * 16)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        items = cli.collect_images([str(tmp_path)], quiet=True)  # said even with --quiet: inputs are left out
    assert [item.path.name for item in items] == ["a.png"]
    assert "skipped 2 video file(s)" in err.getvalue()
    assert "clip.mp4" in err.getvalue() and "take2.MOV" in err.getvalue()


def test_trace_on_a_cpu_only_machine_prints_no_cuda_error(tmp_path):
    """Kineto logs ``gpuGetDeviceCount failed`` from C++ (fd 2) when there is no CUDA device."""
    script = textwrap.dedent(f"""
        import os
        import torch
        from sed_fast.bench.profile import _quiet_kineto
        with _quiet_kineto():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                torch.ones(8).add_(1)
            prof.export_chrome_trace({str(tmp_path / "trace.json")!r})
        print("ok", os.environ.get("KINETO_LOG_LEVEL"))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split()[0] == "ok", result.stderr
    assert "gpuGetDeviceCount" not in result.stderr and "ERROR" not in result.stderr
    assert (tmp_path / "trace.json").stat().st_size > 0
    assert result.stdout.split()[1] == "None"  # the variable is restored (it was unset)
