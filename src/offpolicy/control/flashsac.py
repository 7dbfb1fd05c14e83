"""FlashSAC: SAC with bounded weight, feature and gradient norms, a categorical critic and large batches.

Paper: Kim, Lee, Park, et al., "FlashSAC: Fast and Stable Off-Policy Reinforcement Learning for
High-Dimensional Robot Control", arXiv:2604.04539. Authors' code: github.com/Holiday-Robot/FlashSAC
(``flash_rl/agents/flashSAC``, ``configs/agent/flashSAC.yaml``), read for this implementation.

Delta from SAC:
1. Networks: BatchNorm -> unit-norm linear embedder; ``num_blocks`` inverted residual blocks
   x + ReLU(BN(W2 ReLU(BN(W1 x))))  (W1: h -> 4h, W2: 4h -> h, no biases); RMSNorm after the blocks.
   After every optimizer step every weight row is projected to unit L2 norm and every (BN scale, bias) /
   RMSNorm scale vector to norm sqrt(d) — the weight and feature norm bounds.
2. Critic: twin *categorical* critics over ``num_bins`` atoms on [-G_max, G_max]; the target distribution
   is the min-mean critic's next-state distribution shifted to r + gamma^m (1 - term)(z - alpha log pi(a'|s'))
   and projected onto the atoms (C51); loss = cross-entropy.
3. Rewards are divided by max(sqrt(Var[G]), max|G| / G_max), G the running discounted return (so returns
   stay inside the atoms' support).
4. Temperature: alpha starts at 0.01; L(alpha) = alpha * (H[pi] - H_target) with H_target the entropy of a
   Gaussian of std ``target_sigma`` per dimension, 0.5 |A| log(2 pi e sigma^2).
5. Exploration repeats its Gaussian noise for n ~ Zeta(mu) steps (truncated at ``zeta_max``).
6. Actor and temperature step every ``actor_update_period`` updates, *before* the critic (authors' order);
   target critic EMA with tau 0.01 every update. No target actor; actions for targets from the online actor.
7. Large batch (2048), one update per environment step (the authors' "fewer updates" are relative to
   many parallel environments: UTD 1 per *vector* step).

Defaults (authors' ``flashSAC.yaml``): actor 2 blocks x 128, critic 2 blocks x 256, 101 bins, G_max 5,
batch 2048, buffer 1e6, 10k warm-up, Adam lr 3e-4, tau 0.01, alpha_0 0.01, sigma_target 0.15, actor
period 2, zeta mu 2 / max 16, log-std in [-10, 2] via a tanh squash.

Not verified / not reproduced: the learning-rate schedule (theirs: warm-up then linear decay 3e-4 ->
1.5e-4; here constant), AMP and torch.compile (speed only), asymmetric observations, the optional BC term
(off by default in their config), and the paper's scale (thousands of parallel envs on a GPU). The paper's
text was read only through its abstract and project page; numbers come from the authors' config and code.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from offpolicy.control.loop import OffPolicyConfig
from offpolicy.control.nets import adam, frozen, polyak


class FlashSACConfig(OffPolicyConfig):
    batch_size: int = 2048  # transitions per update
    learning_starts: int = 10_000  # authors' buffer_min_length
    lr: float = 3e-4  # Adam learning rate of actor, critic and temperature
    actor_blocks: int = 2  # inverted residual blocks of the actor
    actor_hidden: int = 128  # actor width (blocks expand 4x inside)
    critic_blocks: int = 2  # inverted residual blocks of each critic
    critic_hidden: int = 256  # critic width
    num_bins: int = 101  # categorical atoms
    g_max: float = 5.0  # atoms span [-g_max, g_max]; rewards are scaled so that |G| <= g_max
    normalize_reward: bool = True  # scale rewards by the running return statistics
    tau: float = 0.01  # target critic EMA
    alpha_init: float = 0.01  # initial temperature
    target_sigma: float = 0.15  # target entropy = that of N(0, sigma^2) per action dimension
    actor_update_period: int = Field(2, ge=1)  # actor + temperature every this many updates
    zeta_mu: float = 2.0  # exploration noise is repeated n ~ Zeta(mu) steps
    zeta_max: int = 16  # ... truncated at this many


# ----- norm-bounded layers (E = ensemble size; the actor uses E = 1) -----
class UnitLinear(nn.Module):
    """Bias-free linear layers whose weight rows are kept at unit L2 norm. (E, B, i) -> (E, B, o)."""

    def __init__(self, n: int, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, d_out, d_in))
        for w in self.weight.data:
            nn.init.orthogonal_(w, gain=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x, self.weight.transpose(1, 2))

    def project(self) -> None:
        self.weight.data.copy_(F.normalize(self.weight.data, dim=-1, eps=1e-8))


class UnitBatchNorm(nn.Module):
    """Batch norm over B per ensemble member; (scale, bias) jointly kept at norm sqrt(d)."""

    def __init__(self, n: int, d: int, momentum: float = 0.01, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(n, d)), nn.Parameter(torch.zeros(n, d))
        self.register_buffer("running_mean", torch.zeros(n, d))
        self.register_buffer("running_var", torch.ones(n, d))
        self.momentum, self.eps = momentum, eps

    def forward(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        if training:
            mean, var = x.mean(1, keepdim=True), x.var(1, correction=0, keepdim=True)
            with torch.no_grad():
                b = x.shape[1]
                self.running_mean.lerp_(mean.squeeze(1), self.momentum)
                self.running_var.lerp_(var.squeeze(1) * (b / max(b - 1, 1)), self.momentum)
        else:
            mean, var = self.running_mean.unsqueeze(1), self.running_var.unsqueeze(1)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight.unsqueeze(1) + self.bias.unsqueeze(1)

    def project(self) -> None:
        d = self.weight.shape[-1]
        sq = (self.weight.data.pow(2) + self.bias.data.pow(2)).sum(-1, keepdim=True)
        f = math.sqrt(d) * torch.rsqrt(sq + 1e-8)
        self.weight.data.mul_(f)
        self.bias.data.mul_(f)


class UnitRMSNorm(nn.Module):
    def __init__(self, n: int, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(n, d)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.unsqueeze(1)

    def project(self) -> None:
        d = self.weight.shape[-1]
        self.weight.data.mul_(math.sqrt(d) * torch.rsqrt(self.weight.data.pow(2).sum(-1, keepdim=True) + 1e-8))


class Trunk(nn.Module):
    """BN -> unit linear embedder, inverted residual blocks, RMSNorm: (E, B, d_in) -> (E, B, h)."""

    def __init__(self, n: int, d_in: int, h: int, blocks: int) -> None:
        super().__init__()
        self.bn_in, self.embed = UnitBatchNorm(n, d_in), UnitLinear(n, d_in, h)
        self.blocks = nn.ModuleList(nn.ModuleList([UnitLinear(n, h, 4 * h), UnitBatchNorm(n, 4 * h),
                                                   UnitLinear(n, 4 * h, h), UnitBatchNorm(n, h)])
                                    for _ in range(blocks))
        self.post = UnitRMSNorm(n, h)

    def forward(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        x = self.embed(self.bn_in(x, training))
        for w1, bn1, w2, bn2 in self.blocks:
            x = x + F.relu(bn2(w2(F.relu(bn1(w1(x), training))), training))
        return self.post(x)


def project_all(module: nn.Module) -> None:
    """The norm bounds: project every unit layer of ``module`` back onto its sphere."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (UnitLinear, UnitBatchNorm, UnitRMSNorm)):
                m.project()


class FlashActor(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hp: FlashSACConfig) -> None:
        super().__init__()
        self.trunk = Trunk(1, obs_dim, hp.actor_hidden, hp.actor_blocks)
        self.mean_w, self.std_w = UnitLinear(1, hp.actor_hidden, act_dim), UnitLinear(1, hp.actor_hidden, act_dim)
        self.mean_b, self.std_b = nn.Parameter(torch.zeros(act_dim)), nn.Parameter(torch.zeros(act_dim))

    def mean_std(self, obs: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(obs.unsqueeze(0), training)
        mean = (self.mean_w(h) + self.mean_b)[0]
        log_std = -10.0 + 12.0 * 0.5 * (1 + torch.tanh((self.std_w(h) + self.std_b)[0]))  # in [-10, 2]
        return mean, log_std.exp()

    def sample(self, obs: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.mean_std(obs, training)
        eps = torch.randn_like(mean)
        u = mean + std * eps
        logp = (-0.5 * eps.pow(2) - std.log() - 0.5 * math.log(2 * math.pi)
                - 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)
        return torch.tanh(u), logp


class FlashCritics(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hp: FlashSACConfig) -> None:
        super().__init__()
        self.trunk = Trunk(2, obs_dim + act_dim, hp.critic_hidden, hp.critic_blocks)
        self.head = UnitLinear(2, hp.critic_hidden, hp.num_bins)
        self.head_b = nn.Parameter(torch.zeros(2, 1, hp.num_bins))
        self.register_buffer("atoms", torch.linspace(-hp.g_max, hp.g_max, hp.num_bins))

    def forward(self, obs: torch.Tensor, act: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([obs, act], -1).expand(2, -1, -1)
        log_probs = F.log_softmax(self.head(self.trunk(x, training)) + self.head_b, -1)  # (2, B, bins)
        return (log_probs.exp() * self.atoms).sum(-1), log_probs  # Q: (2, B)


def categorical_target(next_log_probs: torch.Tensor, rew: torch.Tensor, discount: torch.Tensor,
                       soft: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """Project r + discount * (z - soft) onto the atoms (C51). next_log_probs: (B, K); rew, discount, soft: (B,)."""
    k, lo, hi = atoms.numel(), atoms[0].item(), atoms[-1].item()
    z = (rew[:, None] + discount[:, None] * (atoms[None, :] - soft[:, None])).clamp(lo, hi)  # (B, K)
    b = (z - lo) / ((hi - lo) / (k - 1))
    lower = b.floor().long().clamp(0, k - 1)
    upper = (lower + 1).clamp(max=k - 1)
    frac = b - lower.float()
    p = next_log_probs.exp()
    target = torch.zeros_like(p)
    target.scatter_add_(1, lower, p * (1 - frac))
    target.scatter_add_(1, upper, p * frac)
    return target


class FlashSAC:
    Config = FlashSACConfig

    def __init__(self, obs_dim: int, act_dim: int, hp: FlashSACConfig) -> None:
        self.hp, self.act_dim = hp, act_dim
        actor, critic = FlashActor(obs_dim, act_dim, hp), FlashCritics(obs_dim, act_dim, hp)
        project_all(actor)
        project_all(critic)
        self.nets = nn.ModuleDict({"actor": actor, "critic": critic, "critic_target": copy.deepcopy(critic),
                                   "log_alpha": _Scalar(math.log(hp.alpha_init)), "state": _State(act_dim)})
        self.nets["critic_target"].requires_grad_(False)
        self.target_entropy = 0.5 * act_dim * math.log(2 * math.pi * math.e * hp.target_sigma ** 2)
        pmf = torch.arange(1, hp.zeta_max + 1, dtype=torch.float32).pow(-hp.zeta_mu)
        self.zeta_cdf = (pmf / pmf.sum()).cumsum(0)
        self.opts = {"actor": adam(actor.parameters(), hp.lr), "critic": adam(critic.parameters(), hp.lr),
                     "temperature": adam(self.nets["log_alpha"].parameters(), hp.lr)}

    # ----- reward scale: running discounted return (checkpointed in nets.state) -----
    def observe(self, reward, terminated, truncated) -> None:
        st = self.nets["state"]
        r = torch.as_tensor(reward, dtype=torch.float32)
        if st.g.numel() != r.numel():
            st.g = torch.zeros_like(r)
        done = (torch.as_tensor(terminated, dtype=torch.bool) | torch.as_tensor(truncated, dtype=torch.bool)).float()
        st.g = self.hp.gamma * (1 - done) * st.g + r  # the authors' order: decay by the done flag, then add
        st.g_abs_max.copy_(torch.maximum(st.g_abs_max, st.g.abs().max()))
        n, mean, var = r.numel(), st.g_mean, st.g_var
        delta, tot = st.g.mean() - mean, st.g_count + n
        m2 = var * st.g_count + st.g.var(correction=0) * n + delta.pow(2) * st.g_count * n / tot
        st.g_mean.add_(delta * n / tot)
        st.g_var.copy_(m2 / tot)
        st.g_count.copy_(tot)

    def reward_scale(self) -> torch.Tensor:
        st = self.nets["state"]
        return torch.maximum(torch.sqrt(st.g_var + 1e-8), st.g_abs_max / self.hp.g_max)

    def act(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        mean, std = self.nets["actor"].mean_std(obs, training=False)
        if deterministic:
            return torch.tanh(mean)
        st = self.nets["state"]
        if st.noise.shape != mean.shape:
            st.noise = torch.zeros_like(mean)
        new_noise = torch.randn_like(mean)  # drawn every step, used only on a refresh (fixed RNG use)
        new_n = int(torch.searchsorted(self.zeta_cdf, torch.rand(())).item()) + 1
        if st.count.item() == 0 or st.count.item() >= st.n.item():
            st.noise, st.n, st.count = new_noise, torch.tensor(new_n), torch.tensor(0)
        st.count += 1
        return torch.tanh(mean + std * st.noise)

    def update(self, b: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        hp, actor, critic = self.hp, self.nets["actor"], self.nets["critic"]
        rew = b["rew"] / self.reward_scale() if hp.normalize_reward else b["rew"]
        out: dict[str, torch.Tensor] = {}
        if step % hp.actor_update_period == 0:  # actor and temperature first, as the authors do
            alpha = self.nets["log_alpha"].v.exp().detach()
            a_all, logp_all = actor.sample(torch.cat([b["obs"], b["next_obs"]]), training=True)
            a, logp = a_all[: len(rew)], logp_all[: len(rew)]
            with frozen(critic):
                q = critic(b["obs"], a, training=False)[0].min(0).values
                actor_loss = (alpha * logp - q).mean()
                self.opts["actor"].zero_grad(set_to_none=True)
                actor_loss.backward()
            self.opts["actor"].step()
            project_all(actor)
            entropy = -logp.detach().mean()
            temp_loss = self.nets["log_alpha"].v.exp() * (entropy - self.target_entropy)
            self.opts["temperature"].zero_grad(set_to_none=True)
            temp_loss.backward()
            self.opts["temperature"].step()
            out.update({"losses/actor_loss": actor_loss.detach(), "losses/entropy": entropy,
                        "losses/alpha_loss": temp_loss.detach()})
        alpha = self.nets["log_alpha"].v.exp().detach()
        with torch.no_grad():
            a2, logp2 = actor.sample(b["next_obs"], training=False)
            obs_all, act_all = torch.cat([b["obs"], b["next_obs"]]), torch.cat([b["act"], a2])
            q_all, lp_all = self.nets["critic_target"](obs_all, act_all, training=True)
            n = len(rew)
            j = q_all[:, n:].argmin(0)  # (B,) the critic with the smaller mean
            next_lp = lp_all[:, n:].gather(0, j[None, :, None].expand(1, -1, hp.num_bins))[0]
            target = categorical_target(next_lp, rew, b["discount"], alpha * logp2, critic.atoms)
        q_pred, lp_pred = critic(obs_all, act_all, training=True)
        qf_loss = -(target.unsqueeze(0) * lp_pred[:, :n]).sum(-1).mean()
        self.opts["critic"].zero_grad(set_to_none=True)
        qf_loss.backward()
        self.opts["critic"].step()
        project_all(critic)
        polyak(self.nets["critic_target"], critic, hp.tau)
        out.update({"losses/qf_loss": qf_loss.detach(), "losses/qf_values": q_pred[:, :n].detach().mean(),
                    "losses/alpha": alpha, "losses/reward_scale": self.reward_scale().detach()})
        return out


class _Scalar(nn.Module):
    def __init__(self, v: float) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.tensor(v))


class _State(nn.Module):
    """Non-learned state that a checkpoint must carry: return statistics and the repeated exploration noise."""

    def __init__(self, act_dim: int) -> None:
        super().__init__()
        for name, value in {"g": torch.zeros(1), "g_abs_max": torch.zeros(()), "g_mean": torch.zeros(()),
                            "g_var": torch.ones(()), "g_count": torch.tensor(1e-4), "noise": torch.zeros(1, act_dim),
                            "n": torch.tensor(1), "count": torch.tensor(0)}.items():
            self.register_buffer(name, value)
