"""Mean and spread over seeds from several ``finetune_curves.py`` result files.

    python benchmarks/seed_summary.py --name pushcube_seeds results/scratch_pushcube_c1*.json
    python benchmarks/seed_summary.py --name pickcube_seeds --label decoded="Flow-T (K = 8)" \
        results/finetune_pickcube_s*.json results/finetune_pickcube_mlp*.json results/flowt30k_k8_s*.json

``finetune_curves.py`` writes one file per invocation, and seeds are often run in separate
invocations (or on separate days). This script groups every run in the given files by variant,
keeps one run per (variant, seed) (the longest, when a seed was run twice), cuts each variant to
the evaluation steps all its seeds reached, and prints per variant and step the mean, standard
deviation and min-max of success_once, plus each seed's first step at >= 0.90. Writes
results/<name>.json and results/<name>.png (mean, min-max band, one thin line per seed). It
trains nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import save_success_plot, table, write  # noqa: E402


def collect(paths: list[str]) -> tuple[dict, list[str]]:
    """{variant: {seed: (evals, source)}}, keeping the run with the most evaluations per seed."""
    runs, notes = {}, []
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
            # rows list (variant, seed) in the order their curves were appended
            seen, found = {}, []
            for row in data["rows"]:
                variant, seed = row["variant"], row["seed"]
                k = seen.get(variant, 0)
                seen[variant] = k + 1
                found.append((variant, seed, data["curves"][variant][k]))
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            sys.exit(f"seed_summary: {path}: not a finetune_curves.py result ({type(e).__name__}: {e})")
        for variant, seed, evals in found:
            if not evals:
                sys.exit(f"seed_summary: {path}: {variant} seed {seed} has no evaluations")
            have = runs.setdefault(variant, {}).get(seed)
            if have is not None:
                keep, drop = (have, (evals, path)) if len(have[0]) >= len(evals) else ((evals, path), have)
                notes.append(f"{variant} seed {seed}: kept {keep[1]} ({len(keep[0])} evals), "
                             f"dropped {drop[1]} ({len(drop[0])})")
                runs[variant][seed] = keep
            else:
                runs[variant][seed] = (evals, path)
    return runs, notes


def summarize(runs: dict, labels: dict, threshold: float) -> tuple[list[dict], list[dict], dict]:
    per_step, per_variant, curves = [], [], {}
    for variant, seeds in runs.items():
        label = labels.get(variant, variant)
        seed_ids = sorted(seeds)
        n = min(len(seeds[s][0]) for s in seed_ids)  # the steps every seed reached
        steps = [seeds[seed_ids[0]][0][i]["env_steps"] for i in range(n)]
        for s in seed_ids:  # means over seeds only make sense at the same steps
            theirs = [e["env_steps"] for e in seeds[s][0][:n]]
            if theirs != steps:
                sys.exit(f"seed_summary: {variant} seed {s} ({seeds[s][1]}) evaluated at {theirs}, "
                         f"seed {seed_ids[0]} at {steps}: use runs with the same finetune.eval_every")
        values = [[seeds[s][0][i]["success_once"] for s in seed_ids] for i in range(n)]
        episodes = sorted({e.get("episodes") for s in seed_ids for e in seeds[s][0][:n]} - {None})
        for step, vals in zip(steps, values):
            per_step.append({"variant": label, "env_steps": step, "seeds": len(vals), "mean": statistics.fmean(vals),
                             "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "min": min(vals),
                             "max": max(vals)})
        first = {s: next((e["env_steps"] for e in seeds[s][0] if e["success_once"] >= threshold), None)
                 for s in seed_ids}
        final = values[-1]
        per_variant.append({"variant": label, "seeds": ",".join(map(str, seed_ids)), "steps": steps[-1],
                            "episodes_per_eval": "/".join(map(str, episodes)), "start_mean": statistics.fmean(values[0]),
                            "final_mean": statistics.fmean(final),
                            "final_std": statistics.stdev(final) if len(final) > 1 else 0.0,
                            "final_min": min(final), "final_max": max(final),
                            f"first_{threshold:.2f}": " ".join(f"{v // 1000}k" if v is not None else "-"
                                                                for v in first.values())})
        curves[label] = {"env_steps": steps, "seeds": seed_ids, "success_once": values,
                         "sources": {str(s): seeds[s][1] for s in seed_ids}}
    return per_step, per_variant, curves


def plot(curves: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, c in curves.items():
        ys = np.array(c["success_once"])  # [steps, seeds]
        line, = ax.plot(c["env_steps"], ys.mean(1), marker="o", label=f"{label} ({ys.shape[1]} seeds)")
        ax.fill_between(c["env_steps"], ys.min(1), ys.max(1), color=line.get_color(), alpha=0.15)
        for j in range(ys.shape[1]):
            ax.plot(c["env_steps"], ys[:, j], color=line.get_color(), lw=0.6, alpha=0.5)
    save_success_plot(fig, ax, path, title, "success_once (mean, min-max)", legend_size=8)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="results/<name>.json files written by finetune_curves.py")
    parser.add_argument("--name", required=True, help="writes results/<name>.json and .png")
    parser.add_argument("--label", action="append", default=[], metavar="VARIANT=TEXT",
                        help="display name for a variant, e.g. decoded='Flow-T (K = 8)'")
    parser.add_argument("--threshold", type=float, default=0.9, help="success level whose first step is reported")
    parser.add_argument("--results", default="results")
    args = parser.parse_args()
    labels = {}
    for item in args.label:
        if "=" not in item:
            parser.error(f"--label {item!r}: expected VARIANT=TEXT")
        key, text = item.split("=", 1)
        labels[key] = text

    runs, notes = collect(args.files)
    per_step, per_variant, curves = summarize(runs, labels, args.threshold)
    for note in notes:
        print(note)
    print(table(per_step, list(per_step[0])))
    print()
    print(table(per_variant, list(per_variant[0])))
    os.makedirs(args.results, exist_ok=True)
    png = os.path.join(args.results, f"{args.name}.png")
    plot(curves, png, args.name)
    path = write(args.results, args.name, {"files": args.files, "threshold": args.threshold, "notes": notes,
                                           "variants": per_variant, "per_step": per_step, "curves": curves,
                                           "plot": png})
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
