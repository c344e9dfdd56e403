"""``sed-fast doctor [--device DEV] [--interpret] [--json] ...``: check this machine (see
:mod:`sed_fast.doctor`).

``--interpret`` runs the Triton kernels under Triton's interpreter on CPU tensors. Triton fixes
interpreted-or-compiled when it is imported, so ``TRITON_INTERPRET=1`` is set here before anything
imports it; if Triton was already imported in compiled mode in this process, the doctor runs again in
a new process with the variable set (and says so).

Exit code: 0 no problem found (the last line says what was not checked), 1 something failed, 2 usage error.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

from ..toolkit.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, parse_command_line

_PROG = "sed-fast doctor"
_REEXEC_FLAG = "--_interpreter-reexec"  # internal: the re-run with TRITON_INTERPRET=1 set


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG, description="Check sed_fast on this machine: versions, device, CUDA extension, every backend "
                                "of every op against its reference, what dispatch chooses, and the model end to end. "
                                "A backend that disagrees is excluded from dispatch in this process. "
                                "Exit code 0: no problem found; 1: something failed; 2: usage error.")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--interpret", action="store_true",
                        help="run the Triton kernels under Triton's interpreter on CPU tensors (sets "
                             "TRITON_INTERPRET=1 before Triton is imported; slow, small inputs only)")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated dtypes of the op checks (default: float32 on CPU, float32,bfloat16 "
                             "on CUDA)")
    parser.add_argument("--reps", type=int, default=None, metavar="N",
                        help="timed calls per backend after the first (default 5; --interpret: 1)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end model check")
    parser.add_argument("--resolution", type=int, default=64, metavar="PX",
                        help="encoder input side of the end-to-end check (multiple of 32; default 64)")
    parser.add_argument("--no-build", action="store_true",
                        help="never build the CUDA extension just in time (only report whether it loads)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    parser.add_argument(_REEXEC_FLAG, action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, code = parse_command_line(build_parser(), argv)
    if args is None:
        return code
    if args.reps is not None and args.reps < 0:
        print(f"{_PROG}: error: --reps must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    notes: List[str] = []
    if args.interpret:
        if "triton" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"  # before Triton's import, which fixes its mode
            notes.append("Triton kernels run under the interpreter: TRITON_INTERPRET=1 was set before Triton was "
                         "imported" + (" (in a new process: Triton had been imported in compiled mode)"
                                       if getattr(args, "_interpreter_reexec") else ""))
        from ..kernels import dispatch
        if not dispatch.triton_interpreter_mode():
            if getattr(args, "_interpreter_reexec") or "triton" not in sys.modules:
                print(f"{_PROG}: error: Triton did not start in interpreter mode with TRITON_INTERPRET=1 "
                      "(is Triton installed?)", file=sys.stderr)
                return EXIT_FAILED
            print(f"{_PROG}: Triton was already imported in compiled mode in this process: running again in a new "
                  "process with TRITON_INTERPRET=1", file=sys.stderr)
            env = dict(os.environ, TRITON_INTERPRET="1")
            return subprocess.run([sys.executable, "-m", "sed_fast", "doctor", *argv, _REEXEC_FLAG], env=env).returncode
        os.environ["TRITON_INTERPRET"] = "1"  # the registry offers "triton" for CPU tensors only while it is set
        if not notes:
            notes.append("Triton kernels run under the interpreter (Triton was imported with TRITON_INTERPRET=1)")
    try:
        report = run(args, notes)
    except _Usage as error:
        print(f"{_PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_report(report)
    return EXIT_OK if report["ok"] else EXIT_FAILED


class _Usage(Exception):
    pass


def _parse_device(text: Optional[str], interpret: bool):
    import torch

    if text is None:
        return torch.device("cpu" if interpret or not torch.cuda.is_available() else "cuda")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as error:
        raise _Usage(f"--device {text!r}: {error}") from None
    if device.type not in ("cpu", "cuda"):
        raise _Usage(f"--device {text!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _Usage("--device cuda: CUDA is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise _Usage(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def _parse_dtypes(text: Optional[str], device) -> list:
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if text is None:
        return [torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    dtypes = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        if part not in names:
            raise _Usage(f"--dtypes: unknown dtype {part!r}; expected float32, bfloat16 or float16")
        dtypes.append(names[part])
    if not dtypes:
        raise _Usage("--dtypes is empty")
    return dtypes


def run(args, notes: List[str]) -> Dict[str, object]:
    """All the checks; the report (``ok``: nothing failed)."""
    if args.resolution < 32 or args.resolution % 32:
        raise _Usage(f"--resolution must be a positive multiple of 32, got {args.resolution}")
    import torch

    from . import checks
    from ..kernels import dispatch

    device = _parse_device(args.device, args.interpret)
    dtypes = _parse_dtypes(args.dtypes, device)
    reps = args.reps if args.reps is not None else (1 if args.interpret else 5)
    report: Dict[str, object] = {"notes": notes, "versions": checks.versions(), "device": checks.device_info(device),
                                 "triton_mode": checks.in_process_mode()}
    report["cuda_extension"] = checks.extension_status(device, build=not args.no_build)
    report["backends"] = checks.check_backends(device, dtypes, reps=reps)
    report["dispatch"] = checks.dispatch_table(device, dtypes[0])
    report["excluded"] = [{"op": op, "backend": name, "reason": why} for (op, name), why in dispatch.excluded().items()]
    failed_backends = [r for r in report["backends"] if r["status"] in ("WRONG", "error")]
    if args.no_e2e:
        report["end_to_end"] = None
    else:
        # Interpreted, the official resize of the sample to a 640-pixel short edge takes minutes: the
        # end-to-end check then starts from the encoder's resize (the resize op was checked above).
        preprocess = "none" if args.interpret else "official"
        if args.interpret:
            notes.append("end-to-end check without the official resize (interpreted it takes minutes; the resize "
                         "op itself is checked against Pillow above)")
        report["end_to_end"] = checks.check_end_to_end(device, torch.float32, resolution=args.resolution,
                                                       preprocess=preprocess)
    e2e_ok = report["end_to_end"] is None or bool(report["end_to_end"].get("ok"))
    no_route = [r["op"] for r in report["dispatch"] if r.get("chosen") is None]
    report["ok"] = not failed_backends and e2e_ok and not no_route
    problems = [f"{r['op']} [{r['backend']}] {r['dtype']}: {r['status']}" for r in failed_backends]
    problems += [f"{op}: no backend can run it" for op in no_route]
    if not e2e_ok:
        problems.append("end-to-end check failed")
    report["problems"] = problems
    report["coverage"] = coverage(report)
    return report


def coverage(report: Dict[str, object]) -> Dict[str, object]:
    """What the doctor checked and what it did not, with why: ``checked`` (op, backend, dtype rows
    compared with their reference, whatever the outcome), ``not_checked`` ({reason: [op [backend]]},
    the end-to-end check included when skipped) and ``unavailable`` (backends that cannot run here)."""
    checked = [r for r in report["backends"] if r["status"] not in ("not checked", "unavailable")]
    not_checked: Dict[str, List[str]] = {}
    for r in report["backends"]:
        if r["status"] == "not checked":
            reason = r.get("reason") or "no reason given"
            not_checked.setdefault(reason, []).append(str(r["op"]))
    if report.get("end_to_end") is None:
        not_checked.setdefault("skipped with --no-e2e", []).append("end to end")
    unavailable = [f"{r['op']} [{r['backend']}]" for r in report["backends"] if r["status"] == "unavailable"]
    return {"checked": len(checked), "not_checked": not_checked,
            "not_checked_count": sum(len(names) for names in not_checked.values()), "unavailable": unavailable}


def result_line(report: Dict[str, object]) -> str:
    """The last line: "all is well" only when everything was checked and passed; otherwise how many
    were checked, how many were not and why, and the problems."""
    cover = report.get("coverage") or coverage(report)
    counted = f"{cover['checked']} checked"
    if cover["not_checked_count"]:
        counted += (f", {cover['not_checked_count']} not checked ("
                    + "; ".join(f"{', '.join(names)}: {reason}" for reason, names in cover["not_checked"].items())
                    + ")")
    if cover["unavailable"]:
        counted += f"; {len(cover['unavailable'])} backends cannot run on this device (see the table)"
    if not report["ok"]:
        return "PROBLEMS: " + "; ".join(report["problems"]) + f". {counted}"
    if cover["not_checked_count"]:
        return f"no problems found in what was checked: {counted}"
    return f"all is well: {counted}"


def _table(rows: List[List[str]], right: Sequence[int] = ()) -> List[str]:
    """Rows of cells as aligned lines: each column as wide as its widest cell (the last column,
    free text, unpadded); columns in ``right`` right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        lines.append("  ".join(cells + [row[-1]]).rstrip())
    return lines


# -- printing --------------------------------------------------------------------------------------------
def _fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:.{digits}f}"
    return str(value)


def print_report(report: Dict[str, object], file=None) -> None:
    out = file or sys.stdout

    def say(text=""):
        print(text, file=out)

    for note in report["notes"]:
        say(f"note: {note}")
    v = report["versions"]
    say("== versions")
    say(f"sed_fast {v['sed_fast']}  python {v['python']}  torch {v['torch']}  triton {v['triton']}  "
        f"numpy {v['numpy']}  pillow {v['pillow']}")
    say(f"CUDA (torch built with) {v['torch_cuda'] or 'none'}  cuDNN {v['cudnn'] or '-'}  "
        f"driver {v['driver'] or 'none'}  CPU threads {v['cpu_threads']}  ({v['platform']})")
    d = report["device"]
    say("== device")
    say(f"{d['device']}: {d['name']}" + (f"  compute capability {d['compute_capability']}, {d['memory_gib']} GiB, "
                                         f"{d['multiprocessors']} SMs" if d.get("compute_capability") else
                                         f"  CPU features: {', '.join(d.get('cpu_flags') or []) or 'none of note'}; "
                                         f"the fast model's float32 linears: {d.get('linear')}"))
    mode = report["triton_mode"]
    say(f"Triton: {'interpreter' if mode['triton_interpreter_mode'] else 'compiled'} mode")
    e = report["cuda_extension"]
    say("== CUDA extension")
    say(("loaded (" + str(e["how"]) + ")") if e["loaded"] else f"not loaded: {e['why_not']}")
    say(f"prebuilt sed_fast._C present: {e['prebuilt_sed_fast__C']}; CUDA toolkit: {e['cuda_toolkit'] or 'not found'}; "
        f"csrc/ sources: {'present' if e['sources_present'] else 'absent'}")
    say("== backends vs reference (small random inputs)")
    rows = [["op", "dtype", "backend", "status", "max error", "ms", "speedup", "detail"]]
    for r in report["backends"]:
        detail = r.get("reason") or r.get("error") or (f"against {r['against']}" if r.get("against") else "")
        if r.get("excluded"):
            detail = ("EXCLUDED from dispatch. " + detail).strip()
        rows.append([str(r["op"]), str(r["dtype"] or "-"), str(r["backend"]), str(r["status"]),
                     _fmt(r.get("max_error")), _fmt(r.get("ms")), _fmt(r.get("speedup"), 2), detail[:110]])
    lines = _table(rows, right=(4, 5, 6))
    say(lines[0])
    say("-" * max(len(line) for line in lines[:1]))
    for line in lines[1:]:
        say(line)
    say("== dispatch (what runs each op here, and why)")
    dispatch_rows = [[str(r["op"]), "->", f"{r.get('chosen') or 'NOTHING'}:", str(r["why"])]
                     for r in report["dispatch"]]
    for line in _table(dispatch_rows) if dispatch_rows else []:
        say(line)
    if report["excluded"]:
        say("excluded in this process: " + "; ".join(f"{x['op']}[{x['backend']}]" for x in report["excluded"]))
    say("== end to end (fast vs reference, random weights)")
    e2e = report["end_to_end"]
    if e2e is None:
        say("skipped (--no-e2e)")
    elif e2e.get("error"):
        say(f"FAILED: {e2e['error']}")
    else:
        for run_ in e2e["runs"]:
            say(f"SED-{e2e['variant'].upper()} {e2e['resolution']}px, {e2e['classes']} classes, image "
                f"{e2e['image'][0]}x{e2e['image'][1]} (resize: {e2e['preprocess']}), cer_topk={run_['cer_topk']}: "
                f"max |score diff| "
                f"{_fmt(run_['max_score_diff'])}, labels differ on {run_['labels_differ']} of {run_['pixels']} pixels "
                f"({run_['labels_differ_not_ties']} not ties): {'ok' if run_['ok'] else 'FAILED'}")
        say(f"({e2e['seconds']} s)")
    say("== result")
    say(result_line(report))
