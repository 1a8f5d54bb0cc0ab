"""How many torch ops one fine-tune update dispatches, per recipe: why a GPU learner is launch-bound.

    python benchmarks/update_ops.py [--recipes recipes/pickcube.yaml recipes/pickcube_flowt.yaml]
        [--obs-dim 42 --action-dim 4] [--repeats 20] [--compile] [--name update_ops]

One update is ``SACFlow.update`` with the actor following, as the fine-tune loop calls it:
critic loss (the next action sampled through K flow steps, target critic), backward, clip,
Adam, Polyak targets; then the actor loss (K-step rollout, BC and anchor terms), backward,
clip, Adam (and the temperature step when the recipe learns alpha). Drawing the batch is
not counted. The batch is random (the op count does not depend on the values). Counted with
torch.profiler on the CPU:

- ``aten_calls``: every aten op dispatched, nested ones included (the Python and C++
  dispatch cost scales with this);
- ``compute_ops``: leaf ops that compute, i.e. without views, reshapes and allocations
  (on a GPU each is about one kernel launch).

``cpu_ms_per_update`` is the median wall time of one update on the CPU with one thread, for
scale. ``--compile`` adds a row per recipe with the losses through ``torch.compile``
(``finetune.compile=on``; compiled kernels count as the aten ops they still call, mostly matmuls),
timed in the same run so the two can be compared as a ratio. The defaults are PickCube-v1's state
obs (42) and ``pd_ee_delta_pos`` actions (4).
Writes results/<name>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import table, write  # noqa: E402

NOT_COMPUTE = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::as_strided",
               "aten::t", "aten::transpose", "aten::reshape", "aten::_reshape_alias", "aten::expand",
               "aten::unsqueeze", "aten::squeeze", "aten::permute", "aten::detach", "aten::alias", "aten::select",
               "aten::slice", "aten::unbind", "aten::split", "aten::chunk", "aten::resolve_conj",
               "aten::resolve_neg", "aten::_unsafe_view", "aten::lift_fresh", "aten::result_type", "aten::flatten"}


def build(recipe_path: str, obs_dim: int, action_dim: int, compile: bool = False):
    from flowmanip.algos.sac_flow import SACFlow
    from flowmanip.config import load_recipe
    from flowmanip.models.policy import Policy, build_critic
    from flowmanip.spec import make_spec

    r = load_recipe(recipe_path, [])
    low, high = [-1.0] * action_dim, [1.0] * action_dim
    spec = make_spec(obs_dim=obs_dim, action_low=low, action_high=high, env_low=low, env_high=high)
    policy = Policy(spec, r.policy, r.policy.actor)
    agent = SACFlow(policy, build_critic(policy.encoder.out_dim, spec, r.policy, r.finetune), r.finetune)
    B, d = r.finetune.batch_size, policy.actor.dim
    batch = {"obs": {"state": torch.randn(B, obs_dim)}, "next_obs": {"state": torch.randn(B, obs_dim)},
             "action": torch.rand(B, d) * 2 - 1, "reward": torch.rand(B),
             "discount": torch.full((B,), r.finetune.gamma ** r.policy.chunk), "terminated": torch.zeros(B, dtype=torch.bool)}
    demos = {"obs": {"state": torch.randn(B, obs_dim)}, "action": torch.rand(B, d) * 2 - 1}
    agent.cfg.actor_delay = 1  # every update counted here includes the actor step
    if compile:
        agent.compile_losses()

    def update():
        agent.update(batch, demos)

    return r, update


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipes", nargs="+", default=["recipes/pickcube.yaml", "recipes/pickcube_flowt.yaml"])
    parser.add_argument("--obs-dim", type=int, default=42)
    parser.add_argument("--action-dim", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also time the update with compiled losses")
    parser.add_argument("--results", default="results")
    parser.add_argument("--name", default="update_ops")
    args = parser.parse_args()
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for path, compile in [(p, c) for p in args.recipes for c in ((False, True) if args.compile else (False,))]:
        recipe, update = build(path, args.obs_dim, args.action_dim, compile)
        start = time.perf_counter()
        update()  # first call allocates optimiser state (and compiles)
        first_s = time.perf_counter() - start
        if compile:
            update()  # the actor-only and critic-only variants are in; later calls reuse them
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            update()
        aten = [e for e in prof.events() if e.name.startswith("aten::")]
        leaves = [e for e in aten if not any(c.name.startswith("aten::") for c in e.cpu_children)]
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            update()
            times.append(time.perf_counter() - start)
        rows.append({"recipe": path, "compiled": compile, "first_call_s": round(first_s, 1),
                     "velocity": recipe.policy.velocity, "flow_steps": recipe.policy.flow_steps,
                     "batch_size": recipe.finetune.batch_size, "aten_calls": len(aten),
                     "compute_ops": sum(e.name not in NOT_COMPUTE for e in leaves),
                     "cpu_ms_per_update": round(1000 * statistics.median(times), 1)})
    columns = list(rows[0])
    print(table(rows, columns))
    print(f"wrote {write(args.results, args.name, {'obs_dim': args.obs_dim, 'action_dim': args.action_dim, 'rows': rows})}")


if __name__ == "__main__":
    main()
