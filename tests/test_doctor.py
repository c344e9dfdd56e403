"""``sed-fast doctor`` on CPU: it runs, lists every op, and a backend that disagrees with its
reference (or raises) is reported, excluded from dispatch in the process, and fails the exit code."""
import json
import re

import pytest
import torch

from sed_fast import cli
from sed_fast.doctor import checks
from sed_fast.kernels import cuda_extension, dispatch


def _run_json(capsys, *options):
    code = cli.main(["doctor", "--json", *options])
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_doctor_on_cpu_checks_every_op_end_to_end(capsys):
    code, report = _run_json(capsys, "--device", "cpu", "--reps", "1")
    assert code == 0, report["problems"]
    assert report["ok"] and not report["problems"] and not report["excluded"]
    assert {r["op"] for r in report["backends"]} == set(dispatch.ops())
    assert {r["op"] for r in report["dispatch"]} == set(dispatch.ops())
    torch_rows = [r for r in report["backends"] if r["backend"] == "torch"]
    assert {r["op"] for r in torch_rows} == {case.op for case in checks.CASES}
    assert all(r["status"] == "ok" for r in torch_rows)
    assert all(r["status"] == "not checked" for r in report["backends"] if r["op"] not in checks.CASES_BY_OP)
    # No GPU, no interpreter: the references, and the CPU formulation where an op has one.
    assert all(r["chosen"] == ("cpu" if "cpu" in dispatch._known(r["op"]) else "torch") for r in report["dispatch"])
    assert all(r["status"] == "ok" for r in report["backends"] if r["backend"] == "cpu")
    assert report["versions"]["torch"] == torch.__version__
    # An earlier test in the same process may have built and loaded the extension (nvcc is here);
    # on CPU the report must say what is so and why the extension does not matter.
    assert report["cuda_extension"]["loaded"] is cuda_extension.extension_loaded()
    assert report["cuda_extension"]["why_not"].startswith("not needed on cpu")
    e2e = report["end_to_end"]
    assert e2e["ok"] and [run["cer_topk"] for run in e2e["runs"]] == [None, 2]
    assert all(run["max_score_diff"] <= 1e-4 for run in e2e["runs"])
    cover = report["coverage"]
    assert cover["checked"] == sum(r["status"] not in ("not checked", "unavailable") for r in report["backends"])
    assert cover["not_checked_count"] == sum(r["status"] == "not checked" for r in report["backends"])


def test_doctor_prints_aligned_tables_of_every_op_and_what_it_did_not_check(capsys):
    code = cli.main(["doctor", "--device", "cpu", "--reps", "0", "--no-e2e"])
    out = capsys.readouterr().out
    assert code == 0
    backend_table = out.split("== backends vs reference (small random inputs)\n", 1)[1].split("\n==", 1)[0]
    dispatch_table = out.split("== dispatch (what runs each op here, and why)\n", 1)[1].split("\n==", 1)[0]
    header, _, *rows = backend_table.splitlines()
    column = header.index("status")
    assert len(rows) >= len(dispatch.ops())
    for row in rows:  # every row's status starts under the header's, after a blank
        assert row[column - 1] == " " and row[column] != " ", (row, header)
    arrows = {line.index(" -> ") for line in dispatch_table.splitlines()}
    assert len(arrows) == 1  # one column for the arrows, however long the op names
    for op in dispatch.ops():
        chosen = "cpu" if "cpu" in dispatch._known(op) else "torch"
        assert re.search(rf"^{op} +-> +{chosen}:", dispatch_table, flags=re.M)
        assert out.count(op) >= 2  # rows of the backend table, and the dispatch line
    result = out.rstrip().splitlines()[-1]
    assert "all is well" not in out  # the end-to-end check (and any op without a case) was not run
    not_checked = [r for r in checks.check_backends(torch.device("cpu"), [torch.float32], reps=0)
                   if r["status"] == "not checked"]
    match = re.match(r"no problems found in what was checked: (\d+) checked, (\d+) not checked \((.*)\)", result)
    assert match, result
    assert int(match.group(2)) == len(not_checked) + 1 and "end to end: skipped with --no-e2e" in match.group(3)
    for row in not_checked:
        assert row["op"] in match.group(3)


def test_doctor_says_all_is_well_only_when_everything_was_checked():
    from sed_fast.doctor.cli import coverage, result_line
    report = {"ok": True, "problems": [], "end_to_end": {"ok": True},
              "backends": [{"op": "a", "backend": "torch", "status": "ok"},
                           {"op": "a", "backend": "triton", "status": "unavailable"}]}
    assert coverage(report)["checked"] == 1
    assert result_line(report).startswith("all is well: 1 checked; 1 backends cannot run")
    report["backends"].append({"op": "b", "backend": "torch", "status": "not checked", "reason": "no case"})
    assert result_line(report) == ("no problems found in what was checked: 1 checked, 1 not checked (b: no case); "
                                   "1 backends cannot run on this device (see the table)")
    report.update(ok=False, problems=["a [torch] float32: WRONG"])
    assert result_line(report).startswith("PROBLEMS: a [torch] float32: WRONG. 1 checked, 1 not checked")


@pytest.fixture
def broken_backends():
    """A "triton" cost map that is off by 1% and a "triton" gather that raises, both claiming to run on CPU."""
    saved = {op: dict(dispatch._backends[op]) for op in ("cost_map", "gather_rows")}

    def wrong_cost_map(img, text, channels_last=True):
        return checks.references()["cost_map"](img, text, channels_last) * 1.01

    def raising_gather(x, flat_idx, total):
        raise RuntimeError("injected failure")

    dispatch.register_impl("cost_map", "triton", wrong_cost_map, unavailable=lambda device: None)
    dispatch.register_impl("gather_rows", "triton", raising_gather, unavailable=lambda device: None)
    yield
    for op, backends in saved.items():
        dispatch._backends[op] = backends
        for name in backends:
            dispatch.include(op, name)


def test_a_wrong_backend_is_reported_excluded_and_fails(capsys, broken_backends):
    args = checks.CASES[0].make(torch.device("cpu"), torch.float32, torch.Generator().manual_seed(0))
    assert dispatch.resolve_name("cost_map", "cpu", args) == "triton"  # before: auto picks it

    code, report = _run_json(capsys, "--device", "cpu", "--reps", "0", "--no-e2e")
    assert code == 1 and not report["ok"]
    rows = {(r["op"], r["backend"]): r for r in report["backends"]}
    wrong, failing = rows[("cost_map", "triton")], rows[("gather_rows", "triton")]
    assert wrong["status"] == "WRONG" and wrong["excluded"] and wrong["max_error"] > 1e-3
    assert failing["status"] == "error" and "injected failure" in failing["error"] and failing["excluded"]
    assert rows[("cost_map", "torch")]["status"] == "ok"
    assert {(x["op"], x["backend"]) for x in report["excluded"]} == {("cost_map", "triton"), ("gather_rows", "triton")}
    assert {r["op"]: r["chosen"] for r in report["dispatch"]}["cost_map"] == "torch"
    assert any("cost_map [triton]" in problem for problem in report["problems"])

    # In the rest of the process: "auto" never picks it, asking for it by name says why.
    assert dispatch.resolve_name("cost_map", "cpu", args) == "torch"
    assert "triton" not in dispatch.available_backends("cost_map", "cpu")
    dispatch.set_backend("cost_map", "triton")
    try:
        with pytest.raises(dispatch.BackendError, match="excluded in this process: sed-fast doctor: WRONG"):
            dispatch.resolve_name("cost_map", "cpu", args)
    finally:
        dispatch.set_backend("cost_map", None)


@pytest.mark.skipif(not dispatch.triton_interpreter_mode(),
                    reason="Triton was imported in compiled mode in this process (a CUDA machine): --interpret "
                           "would re-run the doctor in a new process, minutes of interpreted kernels")
def test_doctor_interpret_checks_the_triton_kernels(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # restored after: --interpret sets it for the process
    code, report = _run_json(capsys, "--interpret", "--reps", "0", "--no-e2e")
    assert code == 0, report["problems"]
    triton_rows = [r for r in report["backends"] if r["backend"] == "triton"]
    assert {r["op"] for r in triton_rows} == set(checks.CASES_BY_OP)
    assert all(r["status"] == "ok" for r in triton_rows), triton_rows
    assert all(r["chosen"] == "triton" for r in report["dispatch"] if r["op"] in checks.CASES_BY_OP)
    assert any("interpreter" in note for note in report["notes"])


def test_doctor_usage_errors(capsys):
    assert cli.main(["doctor", "--resolution", "33"]) == 2
    assert cli.main(["doctor", "--dtypes", "float8"]) == 2
    assert cli.main(["doctor", "--bogus"]) == 2
    assert "error" in capsys.readouterr().err
