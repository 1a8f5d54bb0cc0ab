"""The SAC Flow paper's gradient pathology: ||d L_actor / d A_k|| for k = 0..K-1.

    python benchmarks/gradient_pathology.py [--flow-steps 4 8 16] [--updates 300] [--batch 256]

For each velocity field and K: at initialisation, and after ``--updates`` offline SAC Flow
updates (critic + actor, BC term off) on the shipped PickCube demo transitions. The actor
loss is SAC Flow's ``alpha log pi - Q``. Writes results/gradient_pathology.json + .png.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import table, write  # noqa: E402


def grad_profile(agent, batch):
    from flowmanip.algos.sac_flow import flow_state_grad_norms

    torch.manual_seed(123)
    loss, _, states = agent.actor_loss(batch, keep_states=True)
    return flow_state_grad_norms(loss, states)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="recipes/pickcube.yaml")
    parser.add_argument("--flow-steps", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--velocities", nargs="+", default=["mlp", "gated", "decoded"])
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--results", default="results")
    args = parser.parse_args()

    from flowmanip.algos.sac_flow import SACFlow
    from flowmanip.config import load_recipe
    from flowmanip.data import read_dataset
    from flowmanip.data.samples import DemoSamples, normalization_stats
    from flowmanip.models.policy import Policy, build_critic

    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    base = load_recipe(args.recipe)
    _, episodes = read_dataset(base.data.path)
    spec = normalization_stats(episodes, [-1.0] * 4, [1.0] * 4, base.data.action_margin)
    rows = []
    for velocity in args.velocities:
        for K in args.flow_steps:
            torch.manual_seed(0)
            recipe = load_recipe(args.recipe, [f"policy.velocity={velocity}", f"policy.flow_steps={K}",
                                               "finetune.bc_weight=0"])
            samples = DemoSamples(episodes, recipe.policy.chunk, recipe.finetune.gamma)
            policy = Policy(spec, recipe.policy)
            agent = SACFlow(policy, build_critic(policy.encoder.out_dim, spec, recipe.policy, recipe.finetune),
                            recipe.finetune)
            actions = policy.scaler.to_normalized(samples.actions).reshape(len(samples), -1)

            def batch():
                idx = torch.randint(len(samples), (args.batch,))
                b = samples.get(idx)
                b["action"] = actions[idx]
                return b

            probe = batch()
            before = grad_profile(agent, probe)
            critic_opt = torch.optim.Adam(agent.critic_parameters(), lr=3e-4)
            actor_opt = torch.optim.Adam(agent.actor_parameters(), lr=3e-4)
            for _ in range(args.updates):
                b = batch()
                loss, _ = agent.critic_loss(b)
                critic_opt.zero_grad()
                loss.backward()
                critic_opt.step()
                loss, _, _ = agent.actor_loss(b)
                actor_opt.zero_grad()
                loss.backward()
                actor_opt.step()
                agent.update_targets()
            after = grad_profile(agent, probe)
            for when, prof in (("init", before), ("trained", after)):
                rows.append({"velocity": velocity, "K": K, "when": when, "grad_A0": prof[0], "grad_Alast": prof[-1],
                             "ratio_A0_over_Alast": prof[0] / max(prof[-1], 1e-12), "profile": prof})
            print(table(rows, ["velocity", "K", "when", "grad_A0", "grad_Alast", "ratio_A0_over_Alast"]), flush=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.flow_steps), figsize=(4.5 * len(args.flow_steps), 3.5), squeeze=False)
    for ax, K in zip(axes[0], args.flow_steps):
        for r in rows:
            if r["K"] == K:
                ax.semilogy(range(K), r["profile"], marker=".", linestyle="-" if r["when"] == "trained" else ":",
                            label=f"{r['velocity']} ({r['when']})")
        ax.set_title(f"K = {K}")
        ax.set_xlabel("flow step k")
        ax.set_ylabel("||dL/dA_k||")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    png = os.path.join(args.results, "gradient_pathology.png")
    os.makedirs(args.results, exist_ok=True)
    fig.savefig(png, dpi=100)
    path = write(args.results, "gradient_pathology", {"recipe": args.recipe, "updates": args.updates, "rows": rows})
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
