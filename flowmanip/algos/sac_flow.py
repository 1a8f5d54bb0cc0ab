"""SAC Flow (arXiv 2509.25756): SAC whose actor is a K-step noise-augmented flow rollout.

``SACFlow.update`` is one learner step; read it next to docs/design.md ("The SAC Flow
update"), which has the equations. Notation: z = encoder(s); a is an action chunk of H
steps in normalised units, flattened to d = H * action_dim; Q_j are the critic heads,
Qbar_j their Polyak-averaged targets; alpha = exp(log_alpha).

    critic:  y = R + gamma^n (1 - done) (agg_j Qbar_j(s', a') - alpha log pi(a'|s')),  a' ~ pi(.|s')
             L_Q = mean_j (Q_j(s, a) - y)^2
    actor:   L_pi = E[alpha log pi(a|s) - agg_j Q_j(s, a)] / c + beta * BC + lambda * anchor,
             a reparameterised through all K steps
             c = mean |Q| (detached) when normalize_q, else 1: keeps beta meaningful whatever the reward scale
             anchor = E_s ||tanh mu(s) - tanh mu_0(s)||^2, mu the deterministic rollout (the policy eval scores),
             mu_0 frozen copies of the initial actor and encoder, s the first anchor_batch_size states of the batch
             beta and lambda may decay linearly to 0 once the actor starts (bc_decay_steps, anchor_decay_steps)
    alpha:   L_alpha = -log_alpha * (log pi(a|s) + target_entropy)

R is the discounted reward over the n <= H steps the chunk ran and gamma^n the matching
discount (``batch["discount"]``). done is the task's termination (success), or always 0
with ``ignore_terminations`` (the default: success is not absorbing, see config.py). The
encoder is shared: the critic loss trains it, the actor sees detached features, and the
target critic has its own EMA copy of it. A trained encoder (a CNN) changes what the actor
reads, so the anchor's reference mu_0 reads its own frozen encoder, and during the critic
warm-up the actor takes anchor-only steps to follow the encoder the critic is changing.
The tanh-Gaussian baseline uses the same update with a Gaussian actor.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import torch
from torch import nn

from flowmanip.algos.flow_matching import bc_loss

GradSync = Callable[[list], None]  # averages the given parameters' gradients across processes, in place


def aggregate(q: torch.Tensor, how: str) -> torch.Tensor:
    """``q [num_q, B] -> [B]`` by min or mean over the ensemble."""
    return q.min(0).values if how == "min" else q.mean(0)


def _decayed(weight: float, decay_steps: int, warmup: int, updates: int) -> float:
    """`weight` until the actor starts (after `warmup` critic-only updates), then a linear decay to 0
    over `decay_steps` updates when that is > 0."""
    if decay_steps <= 0:
        return weight
    return weight * max(0.0, 1.0 - max(0, updates - warmup) / decay_steps)


def bc_weight_at(cfg, updates: int) -> float:
    """The BC weight after `updates` critic updates (``finetune.bc_decay_steps``)."""
    return _decayed(cfg.bc_weight, cfg.bc_decay_steps, cfg.critic_warmup, updates)


def anchor_weight_at(cfg, updates: int) -> float:
    """The anchor weight after `updates` critic updates (``finetune.anchor_decay_steps``): the anchor holds
    the weak start while the critic is new and lets go as it learns."""
    return _decayed(cfg.anchor_weight, cfg.anchor_decay_steps, cfg.critic_warmup, updates)


def _adam(params, lr: float) -> torch.optim.Adam:
    # fused: one kernel for all parameters (CPU and CUDA), instead of ~10 dispatched ops per tensor
    return torch.optim.Adam(params, lr=lr, fused=True)


class SACFlow(nn.Module):
    """The learner: networks, target networks, optimisers and the update counter.

    ``grad_sync`` (multi-process runs) averages gradients before every optimiser step, so the
    parameters stay identical on every process.
    """

    def __init__(self, policy, critic, cfg, grad_sync: Optional[GradSync] = None):
        super().__init__()
        self.policy, self.critic, self.cfg = policy, critic, cfg
        self.encoder, self.actor = policy.encoder, policy.actor
        self.target_encoder = copy.deepcopy(policy.encoder).requires_grad_(False)
        self.target_critic = copy.deepcopy(critic).requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(cfg.init_alpha)))
        # frozen copies of the initial actor and encoder: the anchor term keeps the executed (deterministic)
        # policy near the initial one, compared on observations, so it holds while the critic trains the encoder
        anchored = cfg.anchor_weight > 0
        self.anchor_actor = copy.deepcopy(self.actor).requires_grad_(False) if anchored else None
        self.anchor_encoder = copy.deepcopy(self.encoder).requires_grad_(False) if anchored else None
        # a trained encoder moves under the actor during the critic warm-up: the actor follows it there
        self.track_in_warmup = anchored and any(p.requires_grad for p in self.encoder.parameters())
        self.target_entropy = float(cfg.target_entropy) if cfg.target_entropy is not None else -float(self.actor.dim)
        self.grad_sync = grad_sync
        self.updates = 0  # critic updates so far (the actor-delay and BC schedules count these)
        self._make_optimizers()
        self.compiled = False  # compile_losses() switches the update to compiled losses
        self._critic_loss, self._actor_loss = self.critic_loss, self.actor_loss

    def compile_losses(self) -> None:
        """Run both losses (forward and backward) through ``torch.compile``: fused C++ kernels on the CPU,
        CUDA graphs on a GPU (``mode="reduce-overhead"``, which replays each loss's kernels as one launch).
        Optimiser steps stay eager (Adam is already fused). Compiling takes a minute the first time; a
        BC or anchor weight that decays (``finetune.bc_decay_steps``, ``anchor_decay_steps``) recompiles per
        value, up to torch's limit."""
        cuda = any(p.is_cuda for p in self.parameters())
        mode = "reduce-overhead" if cuda else None
        self._critic_loss = torch.compile(self.critic_loss, mode=mode, dynamic=False)
        self._actor_loss = torch.compile(self.actor_loss, mode=mode, dynamic=False)
        self.compiled = True

    def _make_optimizers(self) -> None:
        self.critic_opt = _adam(self._critic_groups(), self.cfg.lr_critic)
        self.actor_opt = _adam(self.actor_parameters(), self.cfg.lr_actor)
        self.alpha_opt = _adam([self.log_alpha], self.cfg.lr_alpha)

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp().detach()

    @property
    def bc_weight(self) -> float:
        """The BC weight the next actor step uses."""
        return bc_weight_at(self.cfg, self.updates + 1)

    def critic_parameters(self):
        return list(self.encoder.parameters()) + list(self.critic.parameters())

    def _critic_groups(self):
        """The critic optimiser's parameters: one group, or with ``lr_encoder`` set and an encoder with
        weights, the encoder's at that rate and the critic's at ``lr_critic`` (same order either way)."""
        encoder = list(self.encoder.parameters())
        if self.cfg.lr_encoder is None or not encoder:
            return self.critic_parameters()
        return [{"params": encoder, "lr": self.cfg.lr_encoder}, {"params": list(self.critic.parameters())}]

    def actor_parameters(self):
        return list(self.actor.parameters())

    # --- one update ------------------------------------------------------------------------
    def update(self, batch: dict, demo_batch: Optional[dict] = None, critic_only: bool = False,
               diagnose: bool = False) -> dict:
        """One critic step and Polyak update; then, every ``actor_delay`` critic steps and unless
        ``critic_only`` (the critic warm-up), one actor step and one temperature step. In the warm-up,
        with the anchor on and an encoder with weights, the actor takes an anchor-only step instead.

        ``demo_batch`` (obs, normalised action) feeds the BC term. ``diagnose`` adds
        ``grad_A<k>`` = ||dL_pi / dA_k|| per flow step (the paper's gradient pathology).
        Returns detached scalars for the log.
        """
        loss, info = self._critic_loss(batch)
        info["critic_grad_norm"] = self._step(self.critic_opt, loss, self.critic_parameters(), self.cfg.grad_clip)
        self.update_targets()
        self.updates += 1
        if critic_only:
            if self.track_in_warmup:
                anchor = self.anchor_loss(batch["obs"])
                info["anchor_loss"] = anchor.detach()
                self._step(self.actor_opt, self.cfg.anchor_weight * anchor, self.actor_parameters(), self.cfg.grad_clip)
            return self._own(info)
        if self.updates % self.cfg.actor_delay:
            return self._own(info)

        # the per-flow-state gradients need the rollout's states inside the autograd graph, which a compiled
        # loss hides (it is one node): diagnostic updates, one per log row, run eagerly
        actor_loss = self.actor_loss if diagnose else self._actor_loss
        loss, actor_info, states = actor_loss(batch, demo_batch, bc_weight_at(self.cfg, self.updates),
                                              keep_states=diagnose,
                                              anchor_weight=anchor_weight_at(self.cfg, self.updates))
        if diagnose:
            for k, g in enumerate(flow_state_grad_norms(loss, states)):
                actor_info[f"grad_A{k}"] = g
        actor_info["actor_grad_norm"] = self._step(self.actor_opt, loss, self.actor_parameters(), self.cfg.grad_clip)
        if self.cfg.learn_alpha:
            self._step(self.alpha_opt, self.alpha_loss(actor_info["log_prob"]), [self.log_alpha], 0.0)
        info.update(actor_info)
        return self._own(info)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints written before the anchor had its own encoder copy lack ``anchor_encoder.*``: their
        anchor read the live encoder, so take the saved encoder's weights (exact for the identity encoder)."""
        if self.anchor_encoder is not None and not any(k.startswith(f"{prefix}anchor_encoder.") for k in state_dict):
            for key in [k for k in state_dict if k.startswith(f"{prefix}encoder.")]:
                state_dict[f"{prefix}anchor_encoder." + key[len(f"{prefix}encoder."):]] = state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _own(self, info: dict) -> dict:
        """Compiled on a GPU, a loss's outputs live in CUDA-graph memory the next replay overwrites: copy them."""
        return {k: v.clone() if torch.is_tensor(v) else v for k, v in info.items()} if self.compiled else info

    def _step(self, optimizer, loss: torch.Tensor, params: list, clip: float) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_sync is not None:
            self.grad_sync(params)
        norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True) if clip > 0 else torch.zeros(())
        optimizer.step()
        return norm.detach()

    # --- the losses ------------------------------------------------------------------------
    def critic_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            next_action, next_log_prob, _ = self.actor.sample(self.encoder(batch["next_obs"]))
            q_next = aggregate(self.target_critic(self.target_encoder(batch["next_obs"]), next_action),
                               self.cfg.q_aggregation)
            not_done = 1.0 if self.cfg.ignore_terminations else 1.0 - batch["terminated"].float()
            target = batch["reward"] + batch["discount"] * not_done * (q_next - self.alpha * next_log_prob)
        q = self.critic(self.encoder(batch["obs"]), batch["action"])
        loss = (q - target[None]).pow(2).mean()
        return loss, {"critic_loss": loss.detach(), "q_mean": q.mean().detach(), "target_mean": target.mean()}

    def actor_loss(self, batch: dict, demo_batch: dict | None = None, bc_weight: float = 0.0,
                   keep_states: bool = False, anchor_weight: float | None = None) -> tuple[torch.Tensor, dict, list]:
        """``anchor_weight`` (default ``finetune.anchor_weight``) scales the anchor term; at 0 it is skipped."""
        z = self.encoder(batch["obs"]).detach()
        action, log_prob, states = self.actor.sample(z, keep_states=keep_states)
        q = aggregate(self.critic(z, action), self.cfg.q_aggregation)
        loss = (self.alpha * log_prob - q).mean()
        if self.cfg.normalize_q:
            loss = loss / q.abs().mean().detach().clamp(min=1e-3)
        info = {"actor_q": q.mean().detach(), "log_prob": log_prob.mean().detach(),
                "entropy_estimate": -log_prob.mean().detach()}
        if demo_batch is not None and bc_weight > 0 and self.cfg.bc_type != "none":
            z_demo = self.encoder(demo_batch["obs"]).detach()
            bc = bc_loss(self.actor, z_demo, demo_batch["action"], self.cfg.bc_type, demo_batch.get("action_mask"))
            loss = loss + bc_weight * bc
            info["bc_loss"] = bc.detach()
        anchor_weight = self.cfg.anchor_weight if anchor_weight is None else anchor_weight
        if self.anchor_actor is not None and anchor_weight > 0:
            anchor = self.anchor_loss(batch["obs"], z)
            loss = loss + anchor_weight * anchor
            info["anchor_loss"] = anchor.detach()
        info["actor_loss"] = loss.detach()
        return loss, info, states

    def anchor_loss(self, obs: dict, z: torch.Tensor | None = None) -> torch.Tensor:
        """``E_s ||tanh mu(s) - tanh mu_0(s)||^2`` over the first ``anchor_batch_size`` observations; mu reads
        the live encoder's detached features (``z`` when already computed), mu_0 its frozen encoder's."""
        n = self.cfg.anchor_batch_size
        obs = {k: v[:n] for k, v in obs.items()}
        z = self.encoder(obs).detach() if z is None else z[:n]
        with torch.no_grad():
            reference = torch.tanh(self.anchor_actor.deterministic(self.anchor_encoder(obs)))
        return (torch.tanh(self.actor.deterministic(z)) - reference).pow(2).sum(-1).mean()

    def alpha_loss(self, log_prob: torch.Tensor) -> torch.Tensor:
        """``log_prob``: log pi of fresh actor samples (any shape; only its mean matters)."""
        return -(self.log_alpha * (log_prob.detach().mean() + self.target_entropy))

    @torch.no_grad()
    def update_targets(self) -> None:
        tau = self.cfg.tau
        targets = list(self.target_encoder.parameters()) + list(self.target_critic.parameters())
        online = list(self.encoder.parameters()) + list(self.critic.parameters())
        if targets:
            torch._foreach_lerp_(targets, online, tau)
        for target, source in ((self.target_encoder, self.encoder), (self.target_critic, self.critic)):
            for b_t, b in zip(target.buffers(), source.buffers()):
                b_t.copy_(b)

    # --- resume ----------------------------------------------------------------------------
    def training_state(self) -> dict:
        """Optimiser states and the update counter (the weights are in ``state_dict``)."""
        return {"actor_opt": self.actor_opt.state_dict(), "critic_opt": self.critic_opt.state_dict(),
                "alpha_opt": self.alpha_opt.state_dict(), "updates": self.updates}

    def load_training_state(self, state: dict) -> None:
        """The saved optimiser states; the learning rates are this run's config, so a resume can change them.
        A critic optimiser saved with another grouping (``lr_encoder`` set or unset since) is regrouped:
        its parameters are in the same order either way."""
        for name in ("actor_opt", "critic_opt", "alpha_opt"):
            optimizer = getattr(self, name)
            saved, groups = state[name], optimizer.state_dict()["param_groups"]
            if len(saved["param_groups"]) != len(groups):
                order = [i for g in saved["param_groups"] for i in g["params"]]
                settings = {k: v for k, v in saved["param_groups"][0].items() if k != "params"}
                regrouped, start = [], 0
                for g in groups:
                    regrouped.append({**settings, "params": order[start:start + len(g["params"])]})
                    start += len(g["params"])
                saved = {**saved, "param_groups": regrouped}
            lrs = [g["lr"] for g in optimizer.param_groups]
            optimizer.load_state_dict(saved)
            for g, lr in zip(optimizer.param_groups, lrs):
                g["lr"] = lr
        self.updates = int(state["updates"])


def flow_state_grad_norms(loss: torch.Tensor, states: list) -> list[float]:
    """||d loss / d A_k|| for each flow state A_0..A_{K-1} (the SAC Flow paper's gradient pathology)."""
    if not states:
        return []
    grads = torch.autograd.grad(loss, states, retain_graph=True, allow_unused=True)
    return [float(g.norm()) if g is not None else 0.0 for g in grads]
