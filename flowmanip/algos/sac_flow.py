"""SAC Flow (arXiv 2509.25756): SAC whose actor is a K-step noise-augmented flow rollout.

Read this next to DESIGN.md ("SAC Flow"). Notation: z = encoder(s); a is an action chunk
of H steps in normalised units, flattened to d = H * action_dim; Q_j are the critic heads,
Qbar_j their Polyak-averaged targets; alpha = exp(log_alpha).

    critic:  y = R + gamma^n (1 - done) (agg_j Qbar_j(s', a') - alpha log pi(a'|s')),  a' ~ pi(.|s')
             L_Q = mean_j (Q_j(s, a) - y)^2
    actor:   L_pi = E[alpha log pi(a|s) - agg_j Q_j(s, a)] / c + beta * BC + lambda * anchor,
             a reparameterised through all K steps
             c = mean |Q| (detached) when normalize_q, else 1: keeps beta meaningful whatever the reward scale
             anchor = E_s ||mu(s) - mu_0(s)||^2, mu the deterministic rollout (the policy eval scores),
             mu_0 a frozen copy of the initial actor, s from the same batch as the Q term
    alpha:   L_alpha = -log_alpha * (log pi(a|s) + target_entropy)

R is the discounted reward over the n <= H steps the chunk ran and gamma^n the matching
discount (``batch["discount"]``). done is the task's termination (success), or always 0
with ``ignore_terminations`` (the default: success is not absorbing, see config.py). The encoder is shared: the critic loss trains it, the
actor sees detached features, and the target critic has its own EMA copy of it.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from flowmanip.algos.flow_matching import bc_loss


def aggregate(q: torch.Tensor, how: str) -> torch.Tensor:
    """``q [num_q, B] -> [B]`` by min or mean over the ensemble."""
    return q.min(0).values if how == "min" else q.mean(0)


class SACFlow(nn.Module):
    def __init__(self, policy, critic, cfg):
        super().__init__()
        self.policy, self.critic, self.cfg = policy, critic, cfg
        self.encoder, self.actor = policy.encoder, policy.actor
        self.target_encoder = copy.deepcopy(policy.encoder).requires_grad_(False)
        self.target_critic = copy.deepcopy(critic).requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(cfg.init_alpha)))
        # frozen copy of the initial actor: the anchor term keeps the executed (deterministic) policy near it
        self.anchor_actor = copy.deepcopy(self.actor).requires_grad_(False) if cfg.anchor_weight > 0 else None
        d = self.actor.dim
        self.target_entropy = float(cfg.target_entropy) if cfg.target_entropy is not None else -float(d)

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp().detach()

    def critic_parameters(self):
        return list(self.encoder.parameters()) + list(self.critic.parameters())

    def actor_parameters(self):
        return list(self.actor.parameters())

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
                   keep_states: bool = False) -> tuple[torch.Tensor, dict, list]:
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
            bc = bc_loss(self.actor, z_demo, demo_batch["action"], self.cfg.bc_type)
            loss = loss + bc_weight * bc
            info["bc_loss"] = bc.detach()
        if self.anchor_actor is not None:
            with torch.no_grad():
                reference = torch.tanh(self.anchor_actor.deterministic(z))
            anchor = (torch.tanh(self.actor.deterministic(z)) - reference).pow(2).sum(-1).mean()
            loss = loss + self.cfg.anchor_weight * anchor
            info["anchor_loss"] = anchor.detach()
        info["actor_loss"] = loss.detach()
        return loss, info, states

    def alpha_loss(self, log_prob: torch.Tensor) -> torch.Tensor:
        """``log_prob``: log pi of fresh actor samples (any shape; only its mean matters)."""
        return -(self.log_alpha * (log_prob.detach().mean() + self.target_entropy))

    @torch.no_grad()
    def update_targets(self) -> None:
        tau = self.cfg.tau
        for target, online in ((self.target_encoder, self.encoder), (self.target_critic, self.critic)):
            for p_t, p in zip(target.parameters(), online.parameters()):
                p_t.lerp_(p, tau)
            for b_t, b in zip(target.buffers(), online.buffers()):
                b_t.copy_(b)


def flow_state_grad_norms(loss: torch.Tensor, states: list) -> list[float]:
    """||d loss / d A_k|| for each flow state A_0..A_{K-1} (the SAC Flow paper's gradient pathology)."""
    if not states:
        return []
    grads = torch.autograd.grad(loss, states, retain_graph=True, allow_unused=True)
    return [float(g.norm()) if g is not None else 0.0 for g in grads]
