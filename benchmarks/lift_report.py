"""Side-by-side fine-tunes of one weak pretrained policy: a table and a curve per method.

    python benchmarks/lift_report.py --name lift_pickcube10 --bc runs/pickcube_10demos/pretrain \
        --run "SAC Flow (Flow-G)"=runs/pickcube_10demos/finetune \
        --run "residual (Policy Decorator)"=runs/pickcube_10demos_residual/finetune \
        --run "noise steering (DSRL)"=runs/pickcube_10demos_noise/finetune

Reads each fine-tune's ``metrics.jsonl`` (its periodic evaluations, the recipe's eval seeds) and
``summary.json`` (wall time) and any ``flowmanip eval --json`` results saved beside them as
``eval_seed<S>.json``; ``--bc`` points at the pretrain stage whose ``eval_seed<S>.json`` files give
the behaviour-cloning row. Writes results/<name>.json and results/<name>.png. It trains nothing;
a run still in progress is reported up to its last evaluation.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="results/<name>.json and .png")
    ap.add_argument("--bc", help="the pretrain stage directory all runs start from")
    ap.add_argument("--run", action="append", default=[], metavar="LABEL=STAGE_DIR", help="a fine-tune stage directory")
    ap.add_argument("--title", default=None)
    ap.add_argument("--results-dir", default="results")
    args = ap.parse_args()
    if not args.run:
        ap.error("give at least one --run LABEL=STAGE_DIR")

    rows, runs = [], []
    if args.bc:
        bc = final_evals(args.bc)
        rows.append({"method": "BC only (pretrain)", "env_steps": 0,
                     **{f"seed{s}": f"{r['success_once']:.2f} / {r['success_at_end']:.2f}" for s, r in bc.items()}})
        runs.append({"label": "BC only", "stage_dir": args.bc, "final": bc})
    for spec in args.run:
        label, _, stage_dir = spec.partition("=")
        if not stage_dir:
            ap.error(f"--run {spec!r}: expected LABEL=STAGE_DIR")
        evals = curve(stage_dir)
        summary_path = os.path.join(stage_dir, "summary.json")
        summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
        final = final_evals(stage_dir)
        best = max(evals, key=lambda r: r["success_once"]) if evals else None
        rows.append({"method": label, "env_steps": evals[-1]["env_steps"] if evals else 0,
                     "best_during": f"{best['success_once']:.2f} @ {best['env_steps']}" if best else "-",
                     "wall_s": round(summary["time_s"]) if "time_s" in summary else "running",
                     **{f"seed{s}": f"{r['success_once']:.2f} / {r['success_at_end']:.2f}" for s, r in final.items()}})
        runs.append({"label": label, "stage_dir": stage_dir, "curve": evals, "final": final,
                     "time_s": summary.get("time_s"), "complete": bool(summary)})
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
    bc_level = None
    if args.bc and runs[0]["final"]:
        bc_level = next(iter(runs[0]["final"].values()))["success_once"]
        ax.axhline(bc_level, color="gray", ls="--", label="BC only")
    for run in runs[1 if args.bc else 0:]:
        if run["curve"]:
            ax.plot([r["env_steps"] for r in run["curve"]], [r["success_once"] for r in run["curve"]], marker="o",
                    ms=3, label=run["label"])
    png = os.path.join(args.results_dir, f"{args.name}.png")
    save_success_plot(fig, ax, png, args.title or args.name, legend_size=8)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
