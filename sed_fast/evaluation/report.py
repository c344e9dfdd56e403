"""The outputs of an evaluation, each written atomically to the output folder.

* ``log.txt``: detectron2-style log lines, with the ``copypaste:`` lines of ``print_csv_format``
  (``grep copypaste log.txt`` gives what the official ``eval.sh`` prints);
* ``results.json``: every figure (summary, per class, both mIoU rules), the configuration, git
  commit, library versions, device, image counts and times;
* ``results.md``: the summary and the per-class table (worst classes first);
* ``confusion.npy`` (``confusion_<model>.npy`` when comparing): the (N+1) x (N+1) int64 matrix;
* ``per_class_iou.png``: per-class IoU bars, sorted (needs matplotlib; skipped with a message if absent).

The set is written all or nothing (:func:`sed_fast.base.files.atomic_write_set`): on a full disk the
previous set stays as it was. ``results.json`` is renamed into place last and lists the sha256 of
every other file of its set (``"files"``); :func:`read_results` checks them, so a set mixed by a
crash between two renames is refused (:class:`ResultSetError`), never read as one run's figures.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..base.files import atomic_write_bytes, atomic_write_set
from ..toolkit.record import environment, git_commit
from .metrics import compute_metrics, per_class, summary

__all__ = ["build_results", "write_reports", "read_results", "ResultSetError", "RESULTS_FILE", "log_line",
           "environment", "git_commit", "plot_per_class_iou", "render_per_class_iou"]

RESULTS_FILE = "results.json"


class ResultSetError(Exception):
    """An output folder without a complete, consistent result set."""


def log_line(message: str, when: Optional[float] = None, name: str = "sed_fast.evaluation") -> str:
    """A line as detectron2's file logger writes it: ``[MM/DD HH:MM:SS] name INFO: message``."""
    stamp = time.strftime("%m/%d %H:%M:%S", time.localtime(when if when is not None else time.time()))
    return f"[{stamp}] {name} INFO: {message}"


def _finite(value):
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


def model_results(conf: np.ndarray, class_names: Sequence[str], legacy: bool) -> dict:
    chosen = compute_metrics(conf, class_names, legacy=legacy)
    other = compute_metrics(conf, class_names, legacy=not legacy)
    rule, other_rule = ("legacy", "current") if legacy else ("current", "legacy")
    return {"rule": rule, "summary": summary(chosen), f"summary_{other_rule}_rule": summary(other),
            "per_class": per_class(conf, class_names, legacy=legacy), "detectron2": chosen}


def build_results(*, confusion: Dict[str, np.ndarray], class_names: Sequence[str], legacy: bool, config: dict,
                  dataset: dict, counts: dict, timing: dict, env: dict, counters: Dict[str, int],
                  iou_tolerance: float = 0.0) -> dict:
    """All figures of a run as one JSON-ready dict (NaN as null)."""
    models = {name: model_results(conf, class_names, legacy) for name, conf in confusion.items()}
    results = {"config": config, "dataset": dataset, "images": counts, "timing": timing, "environment": env,
               "mIoU_rule": "legacy (detectron2 <= 0.6)" if legacy else "current (detectron2 >= 0.6 after f3c1bc19)",
               "models": {name: {k: v for k, v in r.items() if k != "detectron2"} for name, r in models.items()},
               "invalid_label_pixels": int(counters.get("invalid_label_pixels", 0))}
    if len(models) == 2:
        results["comparison"] = compare(models, counters, iou_tolerance)
    return _clean(results)


def compare(models: Dict[str, dict], counters: Dict[str, int], tolerance: float) -> dict:
    (name_a, a), (name_b, b) = models.items()
    differing = []
    for ca, cb in zip(a["per_class"], b["per_class"]):
        ia, ib = ca["iou"], cb["iou"]
        if (ia is None) != (ib is None) or (ia is not None and abs(ia - ib) > tolerance):
            differing.append({"index": ca["index"], "name": ca["name"], name_a: ia, name_b: ib,
                              "difference": None if ia is None or ib is None else ia - ib})
    differing.sort(key=lambda d: -abs(d["difference"]) if d["difference"] is not None else -math.inf)
    agree, total = counters.get("agree_pixels", 0), counters.get("compared_pixels", 0)
    agree_l, total_l = counters.get("agree_labelled_pixels", 0), counters.get("compared_labelled_pixels", 0)
    return {"models": [name_a, name_b],
            "pixel_agreement": agree / total if total else None, "pixels_compared": total,
            "pixel_agreement_labelled": agree_l / total_l if total_l else None, "labelled_pixels_compared": total_l,
            "summary_difference": {k: (a["summary"][k] - b["summary"][k])
                                   if a["summary"][k] is not None and b["summary"][k] is not None else None
                                   for k in a["summary"]},
            "iou_tolerance": tolerance, "classes_with_different_iou": differing}


def _clean(value):
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return _finite(float(value))
    if isinstance(value, np.integer):
        return int(value)
    return value


def _fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(results: dict) -> str:
    ds, images, cfg = results["dataset"], results["images"], results["config"]
    lines = [f"# SED evaluation: {ds['name']}", ""]
    if cfg.get("random_weights"):
        lines += ["**RANDOM WEIGHTS: these figures mean nothing.**", ""]
    lines += [f"{images['evaluated']} images ({ds['num_classes']} classes), SED-{str(cfg.get('variant')).upper()}, "
              f"impl {cfg.get('impl')}, {cfg.get('dtype')}, encoder side {cfg.get('resolution')}, "
              f"cer_topk {cfg.get('cer_topk')}, mIoU rule: {results['mIoU_rule']}.", ""]
    names = list(results["models"])
    lines += ["| model | mIoU | fwIoU | mACC | pACC |", "|---|---:|---:|---:|---:|"]
    for name in names:
        s = results["models"][name]["summary"]
        lines.append(f"| {name} | {_fmt(s['mIoU'])} | {_fmt(s['fwIoU'])} | {_fmt(s['mACC'])} | {_fmt(s['pACC'])} |")
    lines.append("")
    if "comparison" in results:
        c = results["comparison"]
        def percent(value):
            return _fmt(100 * value if value is not None else None, 4)

        lines += [f"Pixel agreement of the labels: {percent(c['pixel_agreement'])}% "
                  f"of {c['pixels_compared']} pixels ({percent(c['pixel_agreement_labelled'])}% "
                  f"of the labelled ones). Classes whose IoU differs by more than {c['iou_tolerance']}: "
                  f"{len(c['classes_with_different_iou'])}.", ""]
        if c["classes_with_different_iou"]:
            a, b = c["models"]
            lines += [f"| class | IoU {a} | IoU {b} | difference |", "|---|---:|---:|---:|"]
            for d in c["classes_with_different_iou"][:50]:
                lines.append(f"| {d['name']} | {_fmt(d[a])} | {_fmt(d[b])} | {_fmt(d['difference'], 3)} |")
            lines.append("")
    first = results["models"][names[0]]["per_class"]
    header = "| class | " + " | ".join(f"IoU {n} | ACC {n}" for n in names) + " | GT pixels |"
    lines += ["## Per class (worst IoU first; n/a: not in the ground truth)", "", header,
              "|---|" + "---:|---:|" * len(names) + "---:|"]
    order = sorted(range(len(first)), key=lambda i: (first[i]["iou"] is None, first[i]["iou"] or 0.0, i))
    for i in order:
        cells = " | ".join(f"{_fmt(results['models'][n]['per_class'][i]['iou'])} | "
                           f"{_fmt(results['models'][n]['per_class'][i]['acc'])}" for n in names)
        lines.append(f"| {first[i]['name']} | {cells} | {first[i]['gt_pixels']} |")
    return "\n".join(lines) + "\n"


def plot_per_class_iou(per_class_rows: List[dict], path: Path, title: str, worst: int = 30) -> Optional[str]:
    """Write the per-class IoU bar chart (:func:`render_per_class_iou`) to ``path``; return None,
    or why it was skipped."""
    png = render_per_class_iou(per_class_rows, title, worst)
    if isinstance(png, str):
        return png
    atomic_write_bytes(path, png)
    return None


def render_per_class_iou(per_class_rows: List[dict], title: str, worst: int = 30):
    """The per-class IoU bar chart as PNG bytes, or (a str) why it was skipped (no matplotlib).

    Classes are sorted by IoU. Up to 60 classes: one bar per class, all named. More: all classes
    as an unlabelled sorted profile, plus the ``worst`` classes by name.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: per_class_iou.png skipped (pip install matplotlib)"
    rows = sorted((r for r in per_class_rows if r["iou"] is not None), key=lambda r: (r["iou"], r["index"]))
    if not rows:
        return "no class occurs in the ground truth: per_class_iou.png skipped"
    absent = len(per_class_rows) - len(rows)
    if absent:
        title += f"\n({absent} of {len(per_class_rows)} classes are not in the ground truth: left out)"

    def bars(ax, items, labelled: bool):
        values = [r["iou"] for r in items]
        ax.barh(range(len(items)), values, color=[plt.cm.RdYlGn(v / 100) for v in values])
        ax.set_xlim(0, 100)
        ax.set_xlabel("IoU (%)")
        ax.invert_yaxis()  # worst at the top
        if labelled:
            ax.set_yticks(range(len(items)))
            ax.set_yticklabels([r["name"].split(", ")[0][:40] for r in items], fontsize=8)
            for y, value in enumerate(values):
                ax.text(value + 1, y, f"{value:.1f}", va="center", fontsize=7)
        else:
            ax.set_yticks([])
            ax.set_ylabel(f"{len(items)} classes, sorted")

    if len(rows) <= 60:
        fig, ax = plt.subplots(figsize=(8, max(3.0, 0.22 * len(rows) + 1.2)))
        bars(ax, rows, True)
        ax.set_title(title, fontsize=10)
    else:
        fig, (ax_all, ax_worst) = plt.subplots(1, 2, figsize=(12, max(4.0, 0.22 * worst + 1.2)),
                                               gridspec_kw={"width_ratios": [1, 1.4]})
        bars(ax_all, rows, False)
        ax_all.set_title("all classes", fontsize=9)
        bars(ax_worst, rows[:worst], True)
        ax_worst.set_title(f"the {worst} worst", fontsize=9)
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_reports(out_dir: Path, results: dict, confusion: Dict[str, np.ndarray], log_lines: List[str],
                  plot: bool = True) -> List[str]:
    """Write every output file, all or nothing (``results.json`` last, with the other files'
    sha256 under ``"files"``); return the messages to show (skipped plot)."""
    out_dir = Path(out_dir)
    messages = []
    files: Dict[str, bytes] = {"results.md": markdown(results).encode("utf-8")}
    for name, conf in confusion.items():
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(conf, dtype=np.int64))
        files["confusion.npy" if len(confusion) == 1 else f"confusion_{name}.npy"] = buffer.getvalue()
    previous = (out_dir / "log.txt").read_text(encoding="utf-8") if (out_dir / "log.txt").exists() else ""
    files["log.txt"] = (previous + "\n".join(log_lines) + "\n").encode("utf-8")
    if plot:
        first = next(iter(results["models"]))
        suffix = "" if len(results["models"]) == 1 else f" ({first})"
        title = (f"{results['dataset']['name']}: per-class IoU{suffix}, mIoU "
                 f"{_fmt(results['models'][first]['summary']['mIoU'])}"
                 + (" - RANDOM WEIGHTS" if results["config"].get("random_weights") else ""))
        png = render_per_class_iou(results["models"][first]["per_class"], title)
        if isinstance(png, str):
            messages.append(png)
        else:
            files["per_class_iou.png"] = png
    manifest = dict(results, files={name: hashlib.sha256(data).hexdigest() for name, data in files.items()})
    files[RESULTS_FILE] = (json.dumps(manifest, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    atomic_write_set(out_dir, files)
    return messages


def read_results(out_dir: Path) -> dict:
    """``results.json`` of ``out_dir``, after checking that every file it lists is there with the
    sha256 it records; :class:`ResultSetError` saying what is wrong otherwise."""
    out_dir = Path(out_dir)
    path = out_dir / RESULTS_FILE
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultSetError(f"{out_dir} holds no {RESULTS_FILE}: the evaluation has not finished there "
                             "(rerun it with --resume)") from None
    except (OSError, ValueError) as error:
        raise ResultSetError(f"{path} cannot be read ({type(error).__name__}: {error})") from None
    listed = results.get("files") if isinstance(results, dict) else None
    if not isinstance(listed, dict):
        raise ResultSetError(f"{path} lists no files of its result set (written by another tool or an older "
                             "sed-fast): rerun the evaluation")
    problems = []
    for name, digest in listed.items():
        try:
            with open(out_dir / name, "rb") as handle:
                actual = hashlib.file_digest(handle, "sha256").hexdigest() if hasattr(hashlib, "file_digest") \
                    else hashlib.sha256(handle.read()).hexdigest()
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        if actual != digest:
            problems.append(f"{name} is not the file of this results.json (sha256 {actual[:16]}..., expected "
                            f"{str(digest)[:16]}...)")
    if problems:
        raise ResultSetError(f"the result set in {out_dir} is incomplete or mixed: " + "; ".join(problems)
                             + ". Its files do not come from one run: rerun the evaluation (with --resume it "
                             "only rewrites the results)")
    return results
