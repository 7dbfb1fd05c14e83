"""DSAC-T: Distributional Soft Actor-Critic with three refinements (DSAC-v2).

Paper: Duan et al., "Distributional Soft Actor-Critic with Three Refinements", arXiv:2310.05858.
Authors' code: github.com/Jingliang-Duan/DSAC-v2 (``dsac_v2.py``).

Delta from SAC: each critic is a Gaussian return distribution Z_i(s, a) = N(Q_i, sigma_i^2) trained by a
(scaled) likelihood gradient instead of an MSE; a target *actor* as well as target critics; actor,
temperature and targets step every ``delay_update`` critic steps; the actor's loss is taken with the
critics *before* this step's critic update (authors' order). The three refinements:

1. expected-value substitution: the mean's gradient uses the expected target y, not a sampled one;
2. twin value distributions: the target uses the critic with the smaller mean, and its *sample*;
3. variance-based critic gradient adjustment: the loss is scaled by the EMA batch std omega_i^2 (+ b), and
   the sampled target is clipped to Q_i +- 3 omega_i (adaptive clipping).

With a' ~ pi'(.|s') (target actor), j = argmin_i Q'_i(s', a'), z ~ N(0, 1) clipped to [-3, 3]:

    y      = r + gamma (1 - term) ( Q'_j(s', a')                  - alpha log pi'(a'|s') )
    y_s    = r + gamma (1 - term) ( Q'_j(s', a') + z sigma'_j(s', a') - alpha log pi'(a'|s') )
    omega_i <- (1 - tau_b) omega_i + tau_b mean_B sigma_i(s, a)                          (per critic EMA)
    y_b,i  = Q_i + clip(y_s - Q_i, -3 omega_i, 3 omega_i)
    L_i    = (omega_i^2 + b) mean_B[ -(y - Q_i)/(sg(sigma_i)^2 + b) * Q_i
                                     -((sg(Q_i) - y_b,i)^2 - sg(sigma_i)^2)/(sg(sigma_i)^3 + b) * sigma_i ]
    L_pi   = mean_B( alpha log pi(a~|s) - min_i Q_i(s, a~) ),   L_alpha = -log_alpha mean_B(log pi + H_target)

(sg = stop-gradient; every fraction's numerator is a constant, so dL_i/dQ_i and dL_i/dsigma_i are the
bracketed coefficients.) **Critic-loss version**: the official repository has two. The first upload
(commit c69f7eb) implements exactly the formula above, which is the paper's eq. for the scaled gradient;
the later commit c5105eb ("Optimize Q-loss calculation for complex tasks") replaces it by Huber losses
(delta 50) and a ratio omega^2/(sigma^2 + b) clamped to [0.1, 10]. We implement the **first (paper)
version**; ``tests/control/test_dsac_t.py`` checks its gradient against the formula by hand.

Switches: ``expected_value=False`` uses y_s for the mean too; ``adaptive_clip=False`` uses y_s unclipped;
``grad_scaling=False`` drops the omega^2 + b factor. With all three off and ``bias=0`` the critic gradient is
the gradient of the Gaussian negative log-likelihood -log N(y_s; Q_i, sigma_i^2): a plain distributional
SAC (DSAC-v1 without its fixed clipping) — tested.

Defaults (authors' MuJoCo script ``dsacv2_mlp_mujoco_offserial.py``): 3 x 256 GELU actor and critics; Adam
lr 1e-4 (critics, actor), 3e-4 (temperature); log_alpha starts at 1 (alpha = e); gamma 0.99; tau = tau_b
= 0.005; delay 2; batch 256; buffer 1e6; 10k warm-up steps; actor log-std in [-20, 0.5]; b = 0.1; sigma =
softplus(head). One gradient step per environment step here (the authors' GOPS trainer samples 20 env steps
per iteration; we keep SAC's replay ratio so that the comparison with ``sac`` is like for like).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from offpolicy.control.loop import OffPolicyConfig
from offpolicy.control.nets import Critics, TanhGaussianActor, Temperature, adam, frozen, polyak


class DSACTConfig(OffPolicyConfig):
    hidden: list[int] = Field(default_factory=lambda: [256, 256, 256])  # actor and critic widths
    activation: str = "gelu"  # hidden activation
    learning_starts: int = 10_000  # authors' buffer_warm_size
    actor_lr: float = 1e-4  # actor Adam learning rate
    critic_lr: float = 1e-4  # critics' Adam learning rate
    alpha_lr: float = 3e-4  # temperature Adam learning rate
    alpha_init: float = math.e  # log_alpha starts at 1 in the authors' code
    autotune: bool = True  # learn alpha towards the target entropy
    target_entropy: float | None = None  # None = -dim(A)
    tau: float = 0.005  # Polyak step of target actor and critics
    tau_b: float = 0.005  # EMA step of the per-critic batch std omega_i
    delay_update: int = Field(2, ge=1)  # actor, temperature and targets step every this many critic steps
    bias: float = 0.1  # b: keeps the gradient fractions finite
    clip_k: float = 3.0  # adaptive clip bound in units of omega_i
    z_clip: float = 3.0  # the standard-normal draw of the sampled target is clipped to +- this
    log_std_max: float = 0.5  # actor log-std upper clamp (lower: -20)
    expected_value: bool = True  # refinement: expected-value substitution for the mean's gradient
    adaptive_clip: bool = True  # refinement: clip y_s to Q_i +- clip_k omega_i
    grad_scaling: bool = True  # refinement: scale the critic loss by omega_i^2 + b


def dsac_t_critic_loss(mean: torch.Tensor, std: torch.Tensor, y: torch.Tensor, y_sample: torch.Tensor,
                       omega: torch.Tensor, *, bias: float = 0.1, clip_k: float = 3.0, expected_value: bool = True,
                       adaptive_clip: bool = True, grad_scaling: bool = True) -> torch.Tensor:
    """DSAC-T critic loss (paper version), summed over critics.

    mean, std: (n, B) outputs of the critics; y, y_sample: (B,) expected and sampled targets (constants);
    omega: (n,) EMA of each critic's batch-mean std (a constant).
    """
    std_d = std.detach().clamp(min=0.0)  # (n, B)
    q_d = mean.detach()
    om = omega.detach().unsqueeze(-1)  # (n, 1)
    y_mean = y if expected_value else y_sample
    y_b = q_d + (y_sample - q_d).clamp(-clip_k * om, clip_k * om) if adaptive_clip else y_sample.expand_as(q_d)
    g_mean = -(y_mean - q_d) / (std_d.pow(2) + bias)  # dL/dQ per sample
    g_std = -((q_d - y_b).pow(2) - std_d.pow(2)) / (std_d.pow(3) + bias)  # dL/dsigma per sample
    weight = (om.squeeze(-1).pow(2) + bias) if grad_scaling else torch.ones_like(om.squeeze(-1))  # (n,)
    return (weight * (g_mean * mean + g_std * std).mean(-1)).sum()


def dsac_t_targets(mean_next: torch.Tensor, std_next: torch.Tensor, logp_next: torch.Tensor, rew: torch.Tensor,
                   discount: torch.Tensor, alpha: torch.Tensor, z_clip: float = 3.0) -> tuple[torch.Tensor, ...]:
    """Expected target y and sampled target y_s from the critic with the smaller mean. (n, B) -> (B,), (B,)."""
    j = mean_next.argmin(0, keepdim=True)  # (1, B)
    q_next = mean_next.gather(0, j).squeeze(0)
    z = torch.randn_like(q_next).clamp(-z_clip, z_clip)
    q_next_sample = q_next + z * std_next.gather(0, j).squeeze(0)
    soft = alpha * logp_next
    return rew + discount * (q_next - soft), rew + discount * (q_next_sample - soft)


class StdEMA(nn.Module):
    """omega_i: EMA of each critic's batch-mean std (a buffer, so it is checkpointed); starts at the first batch."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("omega", torch.full((n,), -1.0))

    def update(self, batch_std: torch.Tensor, tau_b: float) -> torch.Tensor:
        if bool((self.omega < 0).all()):
            self.omega.copy_(batch_std)
        else:
            self.omega.lerp_(batch_std, tau_b)
        return self.omega


class DSACT:
    Config = DSACTConfig

    def __init__(self, obs_dim: int, act_dim: int, hp: DSACTConfig) -> None:
        self.hp = hp
        self.target_entropy = -float(act_dim) if hp.target_entropy is None else hp.target_entropy
        actor = TanhGaussianActor(obs_dim, act_dim, hp.hidden, hp.activation, log_std_max=hp.log_std_max)
        critic = Critics(obs_dim, act_dim, hp.hidden, n=2, out=2, act=hp.activation)  # (mean, pre-std) each
        self.nets = nn.ModuleDict({"actor": actor, "actor_target": copy.deepcopy(actor), "critic": critic,
                                   "critic_target": copy.deepcopy(critic), "temperature": Temperature(hp.alpha_init),
                                   "omega": StdEMA(2)})
        self.nets["actor_target"].requires_grad_(False)
        self.nets["critic_target"].requires_grad_(False)
        self.opts = {"actor": adam(actor.parameters(), hp.actor_lr),
                     "critic": adam(critic.parameters(), hp.critic_lr),
                     "temperature": adam(self.nets["temperature"].parameters(), hp.alpha_lr)}

    @staticmethod
    def _dist(critic: nn.Module, obs: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = critic(obs, act)  # (n, B, 2)
        return out[..., 0], F.softplus(out[..., 1])  # mean, std: (n, B)

    def observe(self, reward, terminated, truncated) -> None:
        """Per-step hook of the loop (unused: no running reward statistics)."""

    def act(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        actor = self.nets["actor"]
        return actor.mode(obs) if deterministic else actor.sample(obs)[0]

    def update(self, b: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        hp, actor, critic, temp = self.hp, self.nets["actor"], self.nets["critic"], self.nets["temperature"]
        alpha = temp.alpha.detach()
        mean, std = self._dist(critic, b["obs"], b["act"])  # (2, B)
        omega = self.nets["omega"].update(std.detach().mean(-1), hp.tau_b)
        with torch.no_grad():
            a2, logp2 = self.nets["actor_target"].sample(b["next_obs"])
            mean_n, std_n = self._dist(self.nets["critic_target"], b["next_obs"], a2)
            y, y_s = dsac_t_targets(mean_n, std_n, logp2, b["rew"], b["discount"], alpha, hp.z_clip)
        qf_loss = dsac_t_critic_loss(mean, std, y, y_s, omega, bias=hp.bias, clip_k=hp.clip_k,
                                     expected_value=hp.expected_value, adaptive_clip=hp.adaptive_clip,
                                     grad_scaling=hp.grad_scaling)
        self.opts["critic"].zero_grad(set_to_none=True)
        qf_loss.backward()  # the critic steps after the actor's loss is taken, as in the authors' code
        out = {"losses/qf_loss": qf_loss.detach(), "losses/qf_values": mean.detach().mean(),
               "losses/q_std": std.detach().mean(), "losses/omega": omega.mean().clone(), "losses/alpha": alpha}
        if step % hp.delay_update == 0:
            with frozen(critic):
                a, logp = actor.sample(b["obs"])
                actor_loss = (alpha * logp - self._dist(critic, b["obs"], a)[0].min(0).values).mean()
                self.opts["actor"].zero_grad(set_to_none=True)
                actor_loss.backward()
            self.opts["critic"].step()
            self.opts["actor"].step()
            out.update({"losses/actor_loss": actor_loss.detach(), "losses/entropy": -logp.detach().mean()})
            if hp.autotune:
                alpha_loss = -(temp.log_alpha * (logp.detach() + self.target_entropy).mean())
                self.opts["temperature"].zero_grad(set_to_none=True)
                alpha_loss.backward()
                self.opts["temperature"].step()
                out["losses/alpha_loss"] = alpha_loss.detach()
            polyak(self.nets["actor_target"], actor, hp.tau)
            polyak(self.nets["critic_target"], critic, hp.tau)
        else:
            self.opts["critic"].step()
        return out
