"""Side-by-side fine-tunes of one weak pretrained policy: a table and a curve per method.

    python benchmarks/lift_report.py --name lift_pickcube10 --bc runs/pickcube_10demos/pretrain \
        --run "SAC Flow (Flow-G)"=runs/pickcube_10demos/finetune \
        --run "residual (Policy Decorator)"=runs/pickcube_10demos_residual/finetune \
        --run "noise steering (DSRL)"=runs/pickcube_10demos_noise/finetune

Reads each fine-tune's ``metrics.jsonl`` (its periodic evaluations, the recipe's eval seeds) and
``summary.json`` (wall time) and any ``flowmanip eval --json`` results saved beside them as
``eval_seed<S>.json``; ``--bc`` points at the pretrain stage whose ``eval_seed<S>.json`` files give
the behaviour-cloning row. Several runs under one label (seeds of one method) also get a mean
(min-max) row and one mean curve with a min-max band. ``--previous`` adds the runs of an earlier
report (run on another machine, say). Writes results/<name>.json and results/<name>.png. It trains
nothing; a run still in progress is reported up to its last evaluation.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import save_success_plot, table, write  # noqa: E402


def final_evals(stage_dir: str) -> dict:
    """{seed: eval result} from the ``eval_seed<S>.json`` files in a stage directory."""
    out = {}
    for path in sorted(glob.glob(os.path.join(stage_dir, "eval_seed*.json"))):
        seed = int(re.search(r"eval_seed(\d+)\.json$", path).group(1))
        with open(path) as f:
            out[seed] = json.load(f)
    return out


def curve(stage_dir: str) -> list[dict]:
    rows = []
    path = os.path.join(stage_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"{path}: no such file (is {stage_dir} a fine-tune stage directory?)")
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if "eval/success_once" in row:
                rows.append({"env_steps": row["step"], "success_once": row["eval/success_once"],
                             "success_at_end": row.get("eval/success_at_end")})
    return rows


def load_run(label: str, stage_dir: str) -> dict:
    evals = curve(stage_dir)
    summary_path = os.path.join(stage_dir, "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
    return {"label": label, "stage_dir": stage_dir, "curve": evals, "final": final_evals(stage_dir),
            "time_s": summary.get("time_s"), "complete": bool(summary)}


def once_end(r: dict) -> str:
    return f"{r['success_once']:.2f} / {r['success_at_end']:.2f}"


def run_row(run: dict) -> dict:
    final = {f"seed{s}": once_end(r) for s, r in run["final"].items()}
    if "curve" not in run:  # the behaviour-cloning row
        return {"method": "BC only (pretrain)", "env_steps": 0, **final}
    evals = run["curve"]
    best = max(evals, key=lambda r: r["success_once"]) if evals else None
    return {"method": run["label"], "env_steps": evals[-1]["env_steps"] if evals else 0,
            "best_during": f"{best['success_once']:.2f} @ {best['env_steps']}" if best else "-",
            "wall_s": round(run["time_s"]) if run.get("time_s") else "running", **final}


def group_row(label: str, group: list) -> dict:
    """Mean (min-max) over the runs of one method (its seeds), per evaluation seed range."""
    row = {"method": f"{label}: mean (min-max) of {len(group)} runs"}
    for s in sorted({s for run in group for s in run["final"]}):
        vals = [run["final"][s] for run in group if s in run["final"]]
        once, end = [v["success_once"] for v in vals], [v["success_at_end"] for v in vals]
        row[f"seed{s}"] = (f"{sum(once) / len(once):.2f} ({min(once):.2f}-{max(once):.2f}) / "
                           f"{sum(end) / len(end):.2f} ({min(end):.2f}-{max(end):.2f})"
                           + ("" if len(vals) == len(group) else f" [{len(vals)} runs]"))
    times = [run["time_s"] for run in group if run.get("time_s")]
    row["wall_s"] = (round(sum(times) / len(times)) if times else "running") if len(times) == len(group) else (
        f"{round(sum(times) / len(times))} [{len(times)} done]" if times else "running")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="results/<name>.json and .png")
    ap.add_argument("--bc", help="the pretrain stage directory all runs start from")
    ap.add_argument("--run", action="append", default=[], metavar="LABEL=STAGE_DIR",
                    help="a fine-tune stage directory; give one label to several runs (seeds) for mean and min-max")
    ap.add_argument("--previous", metavar="JSON", help="an earlier report of this script: its runs come first "
                    "(its BC row too, unless --bc is given)")
    ap.add_argument("--title", default=None)
    ap.add_argument("--results-dir", default="results")
    args = ap.parse_args()
    if not args.run and not args.previous:
        ap.error("give at least one --run LABEL=STAGE_DIR")

    runs = []
    if args.previous:
        with open(args.previous) as f:
            runs = [r for r in json.load(f)["runs"] if not (args.bc and "curve" not in r)]
        for run in runs:  # JSON made the eval seeds strings
            run["final"] = {int(s): r for s, r in run["final"].items()}
    if args.bc:
        runs.insert(0, {"label": "BC only", "stage_dir": args.bc, "final": final_evals(args.bc)})
    for spec in args.run:
        label, _, stage_dir = spec.partition("=")
        if not stage_dir:
            ap.error(f"--run {spec!r}: expected LABEL=STAGE_DIR")
        # a run already in the --previous report is replaced, not counted twice
        runs = [r for r in runs if os.path.normpath(r["stage_dir"]) != os.path.normpath(stage_dir)]
        runs.append(load_run(label, stage_dir))
    groups = {}
    for run in runs:
        if "curve" in run:
            groups.setdefault(run["label"], []).append(run)
    rows = [run_row(run) for run in runs]
    for row, run in zip(rows, runs):  # tell the seeds of one method apart
        if len(groups.get(run["label"], [])) > 1:
            row["method"] += f" ({run['stage_dir']})"

    rows += [group_row(label, group) for label, group in groups.items() if len(group) > 1]
    columns = ["method", "env_steps", "best_during", "wall_s"] + sorted(
        {k for r in rows for k in r if k.startswith("seed")}, key=lambda k: int(k[4:]))
    print(table(rows, columns))
    print("seed<S>: success_once / success_at_end over the saved `flowmanip eval --seed S` episodes")
    path = write(args.results_dir, args.name, {"runs": runs, "rows": rows})
    print(f"wrote {path}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    bc = next((run for run in runs if "curve" not in run), None)
    if bc and bc["final"]:
        ax.axhline(next(iter(bc["final"].values()))["success_once"], color="gray", ls="--", label="BC only")
    for label, group in groups.items():
        curves = [[(r["env_steps"], r["success_once"]) for r in run["curve"]] for run in group if run["curve"]]
        if not curves:
            continue
        # the i-th evaluation of every run (their step counts differ by a chunk or so); a run in progress
        # stops the shared curve at its last evaluation
        n = min(len(c) for c in curves)
        steps = [sum(c[i][0] for c in curves) / len(curves) for i in range(n)]
        values = [[c[i][1] for c in curves] for i in range(n)]
        text = label if len(curves) == 1 else f"{label} (mean, min-max of {len(curves)})"
        line, = ax.plot(steps, [sum(v) / len(v) for v in values], marker="o", ms=3, label=text)
        if len(curves) > 1:
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.2)
    png = os.path.join(args.results_dir, f"{args.name}.png")
    save_success_plot(fig, ax, png, args.title or args.name, legend_size=8)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
