"""Metrics to ``metrics.jsonl`` (one JSON object per log step), TensorBoard and, optionally, wandb."""

from __future__ import annotations

import json
import os


class MetricsLogger:
    def __init__(self, stage_dir: str, recipe, stage: str, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = os.path.join(stage_dir, "metrics.jsonl")
        self.tb = self.wandb = None
        if not enabled:
            return
        os.makedirs(stage_dir, exist_ok=True)
        if resume_step is None:
            open(self.path, "w").close()
        else:
            self._truncate_after(resume_step)
        if recipe.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(stage_dir, "tensorboard"), purge_step=resume_step)
        if recipe.logging.wandb:
            import wandb

            from flowmanip.config import to_dict

            self.wandb = wandb.init(project=recipe.logging.wandb_project, name=f"{recipe.name}-{stage}",
                                    dir=stage_dir, config=to_dict(recipe), resume="allow")

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so nothing is repeated."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(kept)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(metrics_path: str, out_png: str, keys: list[str], x_key: str = "step", title: str = "") -> None:
    """Plot the given metric keys against ``x_key`` (skipping rows without them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs = [r[x_key] for r in rows if key in r]
        ax.plot(xs, [r[key] for r in rows if key in r], marker="o" if len(xs) < 30 else None)
        ax.set_xlabel(x_key)
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
