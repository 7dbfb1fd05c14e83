"""Networks shared by the control algorithms: ensembles of critics as batched matmuls, tanh-Gaussian and
deterministic actors. Actions live in [-1, 1]^d (the env wrapper rescales)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "elu": nn.ELU}
LOG2 = math.log(2.0)


def activation(name: str) -> type[nn.Module]:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} unknown; valid: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def mlp(sizes: list[int], act: str = "relu") -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(activation(act)())
    return nn.Sequential(*layers)


class EnsembleLinear(nn.Module):
    """E independent linear layers applied as one batched matmul; init as ``nn.Linear`` per member."""

    def __init__(self, n: int, d_in: int, d_out: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(d_in)
        self.weight = nn.Parameter(torch.empty(n, d_in, d_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, 1, d_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (E, B, d_in) -> (E, B, d_out)
        return torch.baddbmm(self.bias, x, self.weight)


class Critics(nn.Module):
    """``n`` Q-networks Q_i(s, a) evaluated together: returns (n, B, out)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int], n: int = 2, out: int = 1,
                 act: str = "relu") -> None:
        super().__init__()
        sizes = [obs_dim + act_dim, *hidden, out]
        self.n = n
        self.layers = nn.ModuleList(EnsembleLinear(n, sizes[i], sizes[i + 1]) for i in range(len(sizes) - 1))
        self.act = activation(act)()

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, action], -1).expand(self.n, -1, -1)  # (n, B, obs+act)
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return self.layers[-1](x)  # (n, B, out)


def tanh_log_det(u: torch.Tensor) -> torch.Tensor:
    """log |d tanh(u)/du| = log(1 - tanh(u)^2), computed stably; summed over the action dims."""
    return (2.0 * (LOG2 - u - F.softplus(-2.0 * u))).sum(-1)


class TanhGaussianActor(nn.Module):
    """pi(a|s) = tanh(N(mu(s), sigma(s)^2)); log_std clamped to [log_std_min, log_std_max]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int], act: str = "relu",
                 log_std_min: float = -20.0, log_std_max: float = 2.0) -> None:
        super().__init__()
        self.trunk = nn.Sequential(mlp([obs_dim, *hidden], act), activation(act)())
        self.mu = nn.Linear(hidden[-1], act_dim)
        self.log_std = nn.Linear(hidden[-1], act_dim)
        self.log_std_min, self.log_std_max = log_std_min, log_std_max

    def dist_params(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(obs)
        return self.mu(h), self.log_std(h).clamp(self.log_std_min, self.log_std_max)  # (B, A) each

    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised action (B, A) in (-1, 1) and its log-probability (B,)."""
        mu, log_std = self.dist_params(obs)
        eps = torch.randn_like(mu)
        u = mu + log_std.exp() * eps
        logp = (-0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1) - tanh_log_det(u)
        return torch.tanh(u), logp

    def sample_u(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Tensor]:
        """(action, log-prob, pre-tanh u, mu, log_std): for losses that score the same u under another policy."""
        mu, log_std = self.dist_params(obs)
        eps = torch.randn_like(mu)
        u = mu + log_std.exp() * eps
        logp = (-0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1) - tanh_log_det(u)
        return torch.tanh(u), logp, u, mu, log_std

    def log_prob_u(self, obs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """log pi(tanh(u)|obs) from the pre-tanh value u (exact, no atanh)."""
        mu, log_std = self.dist_params(obs)
        z = (u - mu) / log_std.exp()
        return (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1) - tanh_log_det(u)

    def log_prob(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """log pi(action|obs) for actions in (-1, 1) (clamped away from +-1)."""
        mu, log_std = self.dist_params(obs)
        a = action.clamp(-1 + 1e-6, 1 - 1e-6)
        u = torch.atanh(a)
        z = (u - mu) / log_std.exp()
        return (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1) - tanh_log_det(u)

    def mode(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dist_params(obs)[0])


class DeterministicActor(nn.Module):
    """mu(s) = tanh(MLP(s))."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int], act: str = "relu") -> None:
        super().__init__()
        self.net = mlp([obs_dim, *hidden, act_dim], act)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(obs))


class ObsNorm(nn.Module):
    """Per-feature observation standardisation fitted once on an offline dataset (TD3+BC, RO2O):
    ``(obs - mean) / std`` with std floored by 1e-3; identity until :meth:`fit`. Buffers, so checkpoints keep it."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("std", torch.ones(d))

    def fit(self, obs: torch.Tensor) -> None:
        self.mean.copy_(obs.mean(0))
        self.std.copy_(obs.std(0) + 1e-3)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.mean) / self.std


def polyak(target: nn.Module, online: nn.Module, tau: float) -> None:
    """target <- (1 - tau) target + tau online, for every parameter (one fused foreach call)."""
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), tau)


def frozen(module: nn.Module):
    """Context manager: no parameter of ``module`` collects gradients (the actor loss goes through the critic)."""
    return _Frozen(module)


class _Frozen:
    def __init__(self, module: nn.Module) -> None:
        self.params = list(module.parameters())

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


def adam(params, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, foreach=True)


def adam_groups(groups: list[tuple[list[nn.Parameter], float]]) -> torch.optim.Adam:
    """One Adam over several modules; modules sharing a learning rate share a param group, so a step is as
    few fused foreach calls as there are distinct learning rates."""
    by_lr: dict[float, list[nn.Parameter]] = {}
    for params, lr in groups:
        by_lr.setdefault(lr, []).extend(params)
    return torch.optim.Adam([{"params": ps, "lr": lr} for lr, ps in by_lr.items()], foreach=True)


class Temperature(nn.Module):
    """The entropy temperature alpha = exp(log_alpha), a learnable scalar."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha)))

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp()
