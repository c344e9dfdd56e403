"""The client API against a server running on 127.0.0.1: the README's gradio_client example, run
as written, and the load test's hostile and well-formed requests (outcomes only: its timings are
the benchmark's, not a unit test's)."""
import ast
import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import sed_fast.api
from sed_fast.serve.app import Segmenter, build_app, launch_kwargs

pytestmark = pytest.mark.filterwarnings("ignore::sed_fast.RandomWeightsWarning")
pytest.importorskip("gradio_client")

ROOT = Path(__file__).resolve().parents[2]
README_PORT = 7860


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _readme_client_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("**Client API.**"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_client_example_runs_against_a_running_server(tmp_path):
    block = _readme_client_block()
    assert f"http://127.0.0.1:{README_PORT}/" in block
    # The block runs verbatim where the README's port is free here; otherwise only the port changes.
    port = README_PORT if _free(README_PORT) else _free_port()
    model = sed_fast.api.build_sed("b", impl="fast", device="cpu", clip_resolution=64)
    app = build_app(Segmenter(model, random_weights=True), examples_dir=tmp_path / "examples")
    app.launch(prevent_thread_lock=True, **launch_kwargs("127.0.0.1", port))
    try:
        script = tmp_path / "client.py"
        script.write_text(block.replace(f":{README_PORT}/", f":{port}/"), encoding="utf-8")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
    finally:
        app.close()
    assert run.returncode == 0, run.stderr
    overlay_line, classes_line = run.stdout.strip().splitlines()[-2:]
    assert overlay_line.endswith(".png") and Path(overlay_line).is_file()
    found = ast.literal_eval(classes_line)
    assert found and {row[0] for row in found} <= {"sky", "grass", "tree", "water", "mountain"}
    assert sum(row[2] for row in found) > 0


def test_load_test_refuses_hostile_requests_and_completes_the_well_formed_one():
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
    serve_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_load)
    report = serve_load.run_load_test(time_limit=2.0, rounds=1, max_classes=1000, log=lambda message: None)
    refused = {r["request"]: r for r in report["hostile_refused"]}
    assert "has 10,000 characters" in refused["10,000-character name"]["message"]
    assert "5,000 classes were asked for" in refused["5,000 names"]["message"]
    assert "/etc/passwd" in refused["a server path as the vocabulary"]["message"]
    (round_one,) = report["slow_hostile_rounds"]
    assert "server's limit of 2 s per request" in round_one["hostile"]["message"]  # stopped, or refused at once
    assert not round_one["well_formed"]["refused"] and round_one["well_formed"]["classes_found"] > 0
