"""Load test of ``sed-fast serve``'s bounds on 127.0.0.1: does one hostile request block a
well-formed one for longer than the per-request time limit?

    python benchmarks/serve_load.py                     # tiny random-weights model, 5 s limit
    python benchmarks/serve_load.py --time-limit 3 --rounds 2 --json serve_load.json

It serves the demo in this process (random weights, encoder at ``--resolution``), and through
``gradio_client`` sends a bounded number of requests, then stops by itself:

1. one well-formed request alone (its latency is the baseline; its vocabulary's text embeddings
   are computed before the server opens, as for a vocabulary in use);
2. the hostile requests the bounds refuse (a 10,000-character name, 5,000 names, ``/etc/passwd``
   as the vocabulary): each answered with a message, its latency measured;
3. ``--rounds`` times: a hostile request within the bounds but slow (``--max-classes`` new names,
   whose text embeddings would take far longer than the limit), and 0.5 s later a well-formed
   request. The well-formed one waits for the hostile one, which the time limit stops.

``blocked_s`` is the well-formed request's latency minus the baseline: the time the hostile
request held the model. It passes where ``blocked_s <= time limit + --slack`` (the slack covers
the work between two checks of the limit: one chunk of text embeddings) and every refusal came
back with its message. Exit 0 pass, 1 fail. Timings on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

WELL_FORMED = "sky, grass, tree"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _outcome(result) -> Dict[str, object]:
    """What an image request came back with: a message (refused), or the classes found."""
    import re

    overlay, legend, table, _ = result
    message = re.search(r'class="sed-error"[^>]*>(.*?)</div>', legend or "", re.S)
    rows = (table or {}).get("data") if isinstance(table, dict) else table
    return {"refused": message is not None,
            "message": message.group(1).replace("&#x27;", "'").replace("&quot;", '"').strip() if message else None,
            "classes_found": len(rows or []) if overlay else 0}


def run_load_test(*, time_limit: float = 5.0, rounds: int = 1, max_classes: int = 1000, resolution: int = 64,
                  slack: float = 5.0, log=print) -> Dict[str, object]:
    """Serve, send the requests, stop; returns the report (see the module's doc)."""
    from gradio_client import Client, handle_file

    import sed_fast.api
    from sed_fast.demo import draw_sample
    from sed_fast.serve.app import Segmenter, build_app, launch_kwargs
    from sed_fast.serve.limits import Limits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sed_fast.api.build_sed("b", impl="fast", device="cpu", clip_resolution=resolution)
    limits = Limits(time_limit_s=time_limit, max_classes=max_classes)
    segmenter = Segmenter(model, random_weights=True, limits=limits)
    segmenter.prepare_vocabulary([name.strip() for name in WELL_FORMED.split(",")])  # a vocabulary in use
    work = Path(tempfile.mkdtemp(prefix="sed_fast_serve_load_"))
    image = work / "scene.png"
    draw_sample().save(image)
    app = build_app(segmenter, examples_dir=work / "examples")
    _, url, _ = app.launch(prevent_thread_lock=True, **launch_kwargs("127.0.0.1", _free_port()))
    report: Dict[str, object] = {"url": url, "time_limit_s": time_limit, "max_classes": max_classes,
                                 "resolution": resolution, "slack_s": slack}
    try:
        def request(typed: str, vocabulary: str = "typed class names"):
            client = Client(url, verbose=False)
            return client.submit(handle_file(str(image)), typed, vocabulary, "exact", 8, api_name="/segment_image")

        def timed(typed: str, vocabulary: str = "typed class names"):
            start = time.monotonic()
            result = request(typed, vocabulary).result(timeout=600)
            return time.monotonic() - start, _outcome(result)

        request(WELL_FORMED).result(timeout=600)  # the first request warms the forward up: not the baseline
        alone_s, alone = timed(WELL_FORMED)
        report["well_formed_alone"] = {"seconds": round(alone_s, 3), **alone}
        log(f"well-formed request alone: {alone_s:.2f} s, {alone['classes_found']} classes found")

        refused: List[Dict[str, object]] = []
        for what, typed, vocabulary in (("10,000-character name", "x" * 10_000, "typed class names"),
                                        ("5,000 names", ", ".join(f"name {i}" for i in range(5000)),
                                         "typed class names"),
                                        ("a server path as the vocabulary", "", "/etc/passwd")):
            try:
                seconds, outcome = timed(typed, vocabulary)
            except Exception as error:  # noqa: BLE001 - the server's dropdown refuses a value not among its choices
                message = f"refused by Gradio (not among the page's choices): {error}"
                seconds, outcome = 0.0, {"refused": True, "message": message, "classes_found": 0}
            refused.append({"request": what, "seconds": round(seconds, 3), **outcome})
            answer = f"refused: {outcome['message']}" if outcome["refused"] else "ANSWERED"
            log(f"{what}: {seconds:.2f} s, {answer}")
        report["hostile_refused"] = refused

        slow_rounds = []
        for round_index in range(rounds):
            names = ", ".join(f"round {round_index} thing {i}" for i in range(max_classes))
            start = time.monotonic()
            hostile = request(names)
            time.sleep(0.5)  # the hostile request holds the model first
            well_start = time.monotonic()
            well = request(WELL_FORMED)
            well_outcome = _outcome(well.result(timeout=600))
            well_s = time.monotonic() - well_start
            hostile_outcome = _outcome(hostile.result(timeout=600))
            hostile_s = time.monotonic() - start
            blocked = well_s - alone_s
            slow_rounds.append({"hostile_seconds": round(hostile_s, 3), "hostile": hostile_outcome,
                                "well_formed_seconds": round(well_s, 3), "well_formed": well_outcome,
                                "blocked_s": round(blocked, 3)})
            log(f"round {round_index + 1}: hostile ({max_classes} new names) {hostile_s:.2f} s -> "
                f"{hostile_outcome['message'] or 'answered'}; well-formed {well_s:.2f} s "
                f"(blocked {blocked:.2f} s of a {time_limit:g} s limit)")
        report["slow_hostile_rounds"] = slow_rounds
    finally:
        app.close()

    failures = [f"{r['request']} was not refused" for r in report["hostile_refused"] if not r["refused"]]
    failures += [f"{r['request']} took {r['seconds']} s to refuse" for r in report["hostile_refused"]
                 if r["seconds"] > 1.0]
    for i, r in enumerate(report["slow_hostile_rounds"]):
        if not r["well_formed"]["classes_found"]:
            failures.append(f"round {i + 1}: the well-formed request did not complete")
        if r["blocked_s"] > time_limit + slack:
            failures.append(f"round {i + 1}: the well-formed request was blocked {r['blocked_s']} s, more than "
                            f"the {time_limit:g} s limit + {slack:g} s slack")
    report["failures"] = failures
    report["passed"] = not failures
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-limit", type=float, default=5.0, help="the server's --time-limit (default 5 s)")
    parser.add_argument("--rounds", type=int, default=1, help="slow hostile + well-formed pairs (default 1)")
    parser.add_argument("--max-classes", type=int, default=1000, help="the server's --max-classes (default 1000)")
    parser.add_argument("--resolution", type=int, default=64, help="encoder input side (default 64: a tiny model)")
    parser.add_argument("--slack", type=float, default=5.0,
                        help="blocking allowed beyond the limit: one text chunk's work (default 5 s)")
    parser.add_argument("--json", metavar="PATH", help="also write the report here")
    args = parser.parse_args(argv)
    report = run_load_test(time_limit=args.time_limit, rounds=args.rounds, max_classes=args.max_classes,
                           resolution=args.resolution, slack=args.slack)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    for failure in report["failures"]:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
