"""RO2O: Robust Offline-to-Online RL via uncertainty (Q-ensemble) and smoothness (adversarial states).

Paper: Wen, Yu, Yang, Chen, Bai, Wang, "Towards Robust Offline-to-Online Reinforcement Learning via Uncertainty
and Smoothness", arXiv:2309.16973 (JAIR). Built from the authors' code, github.com/BattleWen/RO2O:
``algorithms/offline/ro2o_mujoco.py`` (offline) and ``algorithms/finetune/ro2o_ft_mujoco.py`` (online), and the
README's map from the paper's symbols to the code's flags (eta_1 = 1e-4 fixed, eta_2 = beta_ood, eta_3 =
beta_policy, eps_Q / eps_P / eps_ood, alpha_ood = q_ood_uncertainty_reg, n = sample_size).

Delta from SAC: N critics instead of 2 (SAC-N), target = min over all N; observations normalised by the dataset's
mean and std; three regularisers computed at perturbed states s + delta, where the delta are n offsets drawn
uniformly from the box [-eps, eps]^d. The same n offsets are used for every state in the batch, as in the
authors' code, and "adversarial" means the worst of those n samples (a max, no gradient ascent). The updates
run in the order temperature -> actor -> critics with three optimizers (authors' order, from EDAC), and the
temperature loss is on log alpha (as in their code). Then two phases: ``run.total_steps`` gradient steps on the
dataset, then ``hp.online_steps`` environment steps of fine-tuning with the same agent (loop:
``offpolicy.control.offline``).

    y          = r + gamma^m (1 - term) ( min_i Q'_i(s', a') - alpha log pi(a'|s') ),     a' ~ pi(.|s')
    L_Q        = sum_i mean_B (Q_i(s, a) - y)^2
               + eta_1 mean_B max_k mean_i [ (1-tau) relu(d_ik)^2 + tau min(d_ik, 0)^2 ],
                     d_ik = Q_i(s + delta_k, a) - Q_i(s, a)                       (both sides carry gradient)
               + eta_2 mean_{i, B x n} ( Q_i(s^, a^) - [Q_i(s^, a^) - alpha_ood std_j Q_j(s^, a^)]_sg )^2,
                     s^ = s + delta_k (eps_ood),  a^ ~ pi(.|s^)                  (OOD states pushed down)
    L_pi       = mean_B ( alpha log pi(a~|s) - min_i Q_i(s, a~) )
               + eta_3 mean_B max_k [ KL(N_pi(s) || N_pi(s + delta_k)) + KL(N_pi(s + delta_k) || N_pi(s)) ]
                     (KL of the pre-tanh Gaussians, summed over action dims; both sides carry gradient)
    L_alpha    = -mean_B log_alpha (log pi(a|s) + H_target),   H_target = -dim(A)
    alpha_ood  = max(alpha_ood_0 - decay * update, alpha_ood_min) offline; alpha_ood_min online

Defaults (authors' MuJoCo script, offline): N = 10 critics, 3 x 256 ReLU, Adam lr 3e-4 (actor, critics,
temperature), batch 256, gamma 0.99, tau 5e-3, eta_1 = 1e-4, tau_Q = 0.2 (both hard-coded there), eta_2 = 0.1,
eta_3 = 1.0, eps_Q = eps_P = eps_ood = 0.01, n = 20, alpha_ood 1.0 -> 0.1 with decay 5e-7 per update, log-std
clamped to [-5, 2] (EDAC), 2.5M offline updates. Online (their fine-tune script and README): alpha_ood fixed at
its minimum 0.1, a fresh replay buffer of 250k transitions holding online data only (putting the dataset in
is a commented-out option there; ``online_keep_dataset`` here), updates start after 2500 online transitions
(``learning_starts``), one update per env step, the pre-trained stochastic policy acts from the first step.

Verified against the code: every formula above, the order of the updates, the shared offsets, the max over
samples, the asymmetric Q-smoothness square, which terms are detached, the decay schedule and the
defaults. Choices where the code is ambiguous or differs from our understanding:
* Online losses. The paper says RO2O keeps "a consistent learning procedure in online adaptation without
  requiring special changes to the learning objective", and the authors' first upload (commit a8ce433) keeps
  all three regularisers online. Their latest upload (26ad528 / d066702) comments them out, so fine-tuning
  there is plain SAC-N. ``online_regularize`` (default True: the paper and the first upload) picks between them.
* The Bellman target has no -beta*std term. The uncertainty penalty is the min over N and the OOD term above.
* Offline data online: the authors start the online buffer empty; ``online_keep_dataset=true`` mixes it in.
Not verified: the paper's own text beyond the abstract and the README's symbol map (the PDF was not readable
here), the network initialisation (EDAC's constant 0.1 biases and small last layers; ours is PyTorch's
default), and any result at the paper's scale (D4RL MuJoCo / AntMaze, 2.5M + 250k steps).
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field
from torch import nn

from offpolicy.control.loop import OffPolicyConfig
from offpolicy.control.nets import Critics, ObsNorm, TanhGaussianActor, Temperature, adam, frozen, polyak
from offpolicy.control.offline import OfflineAgent
from offpolicy.control.sac import critic_mse, soft_target


class RO2OConfig(OffPolicyConfig):
    hidden: list[int] = Field(default_factory=lambda: [256, 256, 256])  # authors: 3 x 256
    buffer_size: int = 250_000  # online replay capacity (authors' memory_size)
    learning_starts: int = 2500  # online transitions before the first online update (authors' train_starts)
    dataset: str = ""  # JSON-lines dataset (offpolicy control collect)
    normalize_obs: bool = True  # normalise observations by the dataset's mean / std (offline and online)
    online_steps: int = Field(0, ge=0)  # env steps of online fine-tuning after run.total_steps offline updates
    online_keep_dataset: bool = False  # online buffer starts with the dataset (authors: False, online data only)
    online_regularize: bool = True  # keep the smoothness / OOD losses online (paper; False = their latest upload)
    n_critics: int = Field(10, ge=2)  # ensemble size N
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    alpha_lr: float = 3e-4
    tau: float = 5e-3  # Polyak step of the target critics
    log_std_min: float = -5.0  # EDAC's clamp (SAC: -20)
    beta_q_smooth: float = 1e-4  # eta_1 (hard-coded in the authors' code)
    q_smooth_tau: float = 0.2  # weight of Q(s+delta) < Q(s) in the asymmetric smoothness square
    beta_ood: float = 0.1  # eta_2
    beta_policy: float = 1.0  # eta_3
    q_smooth_eps: float = 0.01  # eps_Q: box radius of the perturbations (in normalised units)
    policy_smooth_eps: float = 0.01  # eps_P
    ood_smooth_eps: float = 0.01  # eps_ood
    sample_size: int = Field(20, ge=1)  # n perturbations per state
    ood_reg: float = 1.0  # alpha_ood at the first offline update
    ood_reg_min: float = 0.1  # its floor, and its value online
    ood_reg_decay: float = 5e-7  # linear decay per offline update


# ----- the math: pure functions of tensors -----
def perturb(obs: torch.Tensor, eps: float, n: int) -> torch.Tensor:
    """(B, D) -> (B, n, D): s + delta_k, delta_k ~ U[-eps, eps]^D, the same n offsets for every state."""
    delta = (torch.rand(n, obs.shape[-1]) - 0.5) * (2 * eps)
    return obs.unsqueeze(1) + delta


def q_smooth_loss(q_noised: torch.Tensor, q: torch.Tensor, tau: float) -> torch.Tensor:
    """mean_B max_k mean_i [(1-tau) relu(d)^2 + tau min(d, 0)^2], d = q_noised - q.  q_noised (N,B,n), q (N,B)."""
    d = q_noised - q.unsqueeze(-1)
    per = ((1 - tau) * d.clamp(min=0).pow(2) + tau * d.clamp(max=0).pow(2)).mean(0)  # (B, n)
    return per.max(-1).values.mean()


def gaussian_kl(mu1, log_std1, mu2, log_std2) -> torch.Tensor:
    """KL(N(mu1, s1^2) || N(mu2, s2^2)) elementwise."""
    return log_std2 - log_std1 + (torch.exp(2 * log_std1) + (mu1 - mu2).pow(2)) / (2 * torch.exp(2 * log_std2)) - 0.5


def policy_smooth_loss(mu, log_std, mu_n, log_std_n) -> torch.Tensor:
    """mean_B max_k sum_A [KL(p || p_k) + KL(p_k || p)].  mu, log_std (B, A); mu_n, log_std_n (B, n, A)."""
    mu, log_std = mu.unsqueeze(1), log_std.unsqueeze(1)
    kl = gaussian_kl(mu, log_std, mu_n, log_std_n) + gaussian_kl(mu_n, log_std_n, mu, log_std)
    return kl.sum(-1).max(-1).values.mean()


def ood_loss(q_ood: torch.Tensor, reg: float) -> torch.Tensor:
    """mean (Q - sg[Q - reg * std_ens(Q)])^2 over critics and states; q_ood (N, M). Value = mean (reg * std)^2."""
    target = (q_ood - reg * q_ood.std(0)).detach()
    return (q_ood - target).pow(2).mean()


def ood_reg_at(hp: RO2OConfig, update: int, online: bool) -> float:
    return hp.ood_reg_min if online else max(hp.ood_reg - hp.ood_reg_decay * update, hp.ood_reg_min)


class RO2O(OfflineAgent):
    Config = RO2OConfig

    def __init__(self, obs_dim: int, act_dim: int, hp: RO2OConfig) -> None:
        self.hp, self.online = hp, False
        self.target_entropy = -float(act_dim)
        actor = TanhGaussianActor(obs_dim, act_dim, hp.hidden, "relu", log_std_min=hp.log_std_min)
        critic = Critics(obs_dim, act_dim, hp.hidden, n=hp.n_critics)
        self.nets = nn.ModuleDict({"actor": actor, "critic": critic, "critic_target": copy.deepcopy(critic),
                                   "temperature": Temperature(1.0), "obs_norm": ObsNorm(obs_dim)})
        self.nets["critic_target"].requires_grad_(False)
        self.opts = {"actor": adam(actor.parameters(), hp.actor_lr), "critic": adam(critic.parameters(), hp.critic_lr),
                     "alpha": adam(self.nets["temperature"].parameters(), hp.alpha_lr)}

    def start_online(self) -> None:
        self.online = True

    def act(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        actor = self.nets["actor"]
        obs = self._norm(obs)
        return actor.mode(obs) if deterministic else actor.sample(obs)[0]

    # ----- losses -----
    def critic_loss(self, obs, act, rew, nxt, discount, alpha, reg: float, regularize: bool):
        """L_Q on normalised observations; returns (loss, metrics). Draws a', then the Q and OOD offsets."""
        hp, actor, critic = self.hp, self.nets["actor"], self.nets["critic"]
        with torch.no_grad():
            a2, logp2 = actor.sample(nxt)
            y = soft_target(self.nets["critic_target"](nxt, a2).squeeze(-1), logp2, rew, discount, alpha)
        q = critic(obs, act).squeeze(-1)  # (N, B)
        qf_loss = critic_mse(q, y)
        out = {"losses/qf_loss": qf_loss.detach(), "losses/qf_values": q.detach().mean(),
               "losses/q_std": q.detach().std(0).mean()}
        loss = qf_loss
        B, n = obs.shape[0], hp.sample_size
        if regularize and hp.beta_q_smooth > 0:
            s_n = perturb(obs, hp.q_smooth_eps, n).reshape(B * n, -1)
            q_n = critic(s_n, act.repeat_interleave(n, 0)).reshape(hp.n_critics, B, n)
            smooth = q_smooth_loss(q_n, q, hp.q_smooth_tau)
            loss = loss + hp.beta_q_smooth * smooth
            out["losses/q_smooth_loss"] = smooth.detach()
        if regularize and hp.beta_ood > 0:
            s_o = perturb(obs, hp.ood_smooth_eps, n).reshape(B * n, -1)
            with torch.no_grad():
                a_o = actor.sample(s_o)[0]
            ood = ood_loss(critic(s_o, a_o).squeeze(-1), reg)
            loss = loss + hp.beta_ood * ood
            out["losses/ood_loss"] = ood.detach()
        return loss, out

    def actor_loss(self, obs, alpha, regularize: bool):
        hp, actor, critic = self.hp, self.nets["actor"], self.nets["critic"]
        with frozen(critic):
            a, logp = actor.sample(obs)
            sac_loss = (alpha * logp - critic(obs, a).squeeze(-1).min(0).values).mean()
        loss, out = sac_loss, {"losses/actor_loss": sac_loss.detach(), "losses/entropy": -logp.detach().mean()}
        if regularize and hp.beta_policy > 0:
            B, n = obs.shape[0], hp.sample_size
            mu, log_std = actor.dist_params(obs)
            mu_n, log_std_n = actor.dist_params(perturb(obs, hp.policy_smooth_eps, n).reshape(B * n, -1))
            smooth = policy_smooth_loss(mu, log_std, mu_n.reshape(B, n, -1), log_std_n.reshape(B, n, -1))
            loss = loss + hp.beta_policy * smooth
            out["losses/policy_smooth_loss"] = smooth.detach()
        return loss, out

    def update(self, b: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        hp, actor, temp = self.hp, self.nets["actor"], self.nets["temperature"]
        regularize = hp.online_regularize or not self.online
        reg = ood_reg_at(hp, step, self.online)
        obs, nxt = self._norm(b["obs"]), self._norm(b["next_obs"])
        # 1. temperature (authors' order: alpha, actor, critics; each sees the previous one's step)
        with torch.no_grad():
            logp = actor.sample(obs)[1]
        alpha_loss = -(temp.log_alpha * (logp + self.target_entropy)).mean()
        _step(self.opts["alpha"], alpha_loss)
        alpha = temp.alpha.detach()
        # 2. actor
        actor_loss, out = self.actor_loss(obs, alpha, regularize)
        _step(self.opts["actor"], actor_loss)
        # 3. critics
        critic_loss, q_out = self.critic_loss(obs, b["act"], b["rew"], nxt, b["discount"], alpha, reg, regularize)
        _step(self.opts["critic"], critic_loss)
        polyak(self.nets["critic_target"], self.nets["critic"], hp.tau)
        out.update(q_out)
        out.update({"losses/alpha": alpha, "losses/alpha_loss": alpha_loss.detach(),
                    "losses/ood_reg": torch.tensor(reg)})
        return out


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
