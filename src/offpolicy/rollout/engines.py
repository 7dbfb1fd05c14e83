"""Rollout engines: sample responses *and* the log-probability of every sampled token.

- :class:`TinyEngine` — a batched KV-cache sampler for the built-in tiny GPT
  (one forward pass per generated token for the whole batch).
- :class:`HFEngine` — ``transformers``' ``generate`` for Hugging Face models.

Both report log-probs under the distribution actually sampled from (logits /
temperature, then top-p renormalisation) and count generated tokens and time,
so the runner can log ``rollout/tokens_per_s``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from offpolicy.policy.model import Policy
from offpolicy.policy.tiny import KVCache


@dataclass
class SamplingParams:
    """How to sample: ``greedy`` ignores temperature and top-p."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Generation:
    response_ids: list[int]  # includes the EOS token when the model stopped by itself
    logprobs: list[float]  # one per response token, under the sampling distribution
    finished: bool  # True if the model emitted EOS


class Engine(Protocol):
    policy: Policy
    tokens_generated: int
    seconds: float

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int | None = None) -> list[Generation]: ...


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of ``logits`` (B, V); return tokens (B,) and their log-probs (B,)."""
    logits = logits.float()
    if params.greedy:
        logprobs = F.log_softmax(logits, dim=-1)
        tokens = logits.argmax(-1)
        return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    logprobs = F.log_softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_lp, order = logprobs.sort(dim=-1, descending=True)
        cum = sorted_lp.exp().cumsum(-1)
        drop_sorted = (cum - sorted_lp.exp()) >= params.top_p  # keep the smallest prefix reaching top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logprobs = F.log_softmax(logprobs.masked_fill(drop, float("-inf")), dim=-1)
    tokens = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


class TinyEngine:
    """Batched KV-cache sampler for :class:`~offpolicy.policy.tiny.TinyGPT`."""

    def __init__(self, policy: Policy, max_batch: int = 1024) -> None:
        if policy.kind != "tiny":
            raise ValueError("TinyEngine runs the built-in tiny model; use HFEngine for Hugging Face models")
        self.policy = policy
        self.max_batch = max_batch
        self.tokens_generated = 0
        self.seconds = 0.0

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int | None = None) -> list[Generation]:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        start = time.perf_counter()
        out: list[Generation] = []
        for i in range(0, len(prompts), self.max_batch):
            out.extend(self._generate_chunk(prompts[i : i + self.max_batch], params, gen))
        self.seconds += time.perf_counter() - start
        self.tokens_generated += sum(len(g.response_ids) for g in out)
        return out

    @torch.inference_mode()
    def _generate_chunk(self, prompts: list[list[int]], params: SamplingParams, gen) -> list[Generation]:
        model, tok = self.policy.model, self.policy.tokenizer
        B, P, N = len(prompts), max(len(p) for p in prompts), params.max_new_tokens
        if P + N > model.cfg.max_len:
            raise ValueError(f"prompt ({P}) + max_new_tokens ({N}) exceeds the model's max_len={model.cfg.max_len}")
        ids = torch.full((B, P), tok.pad_id, dtype=torch.long)
        attn = torch.zeros((B, P + N), dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
            attn[i, P - len(p) : P] = True
        n_prompt = attn.sum(1)  # (B,) real prompt tokens = position of the first generated token
        cache = KVCache(model.cfg, B, P + N, next(model.parameters()).dtype, ids.device)
        was_training = model.training
        model.eval()
        logits = model(ids, attention_mask=attn[:, :P], cache=cache)[:, -1]  # (B, V)
        tokens = torch.full((B, N), tok.pad_id, dtype=torch.long)
        logps = torch.zeros((B, N))
        done = torch.zeros(B, dtype=torch.bool)
        lengths = torch.zeros(B, dtype=torch.long)
        for t in range(N):
            nxt, lp = sample_tokens(logits, params, gen)
            nxt = nxt.masked_fill(done, tok.pad_id)
            tokens[:, t], logps[:, t] = nxt, lp.masked_fill(done, 0.0)
            lengths += (~done).long()
            done |= nxt == tok.eos_id
            if bool(done.all()) or t == N - 1:
                break
            attn[:, P + t] = True
            pos = (n_prompt + t)[:, None]
            logits = model(nxt[:, None], attention_mask=attn[:, : P + t + 1], position_ids=pos, cache=cache)[:, -1]
        model.train(was_training)
        result = []
        for i in range(B):
            n = int(lengths[i])
            ids_i = tokens[i, :n].tolist()
            result.append(Generation(ids_i, logps[i, :n].tolist(), bool(n and ids_i[-1] == tok.eos_id)))
        return result


class HFEngine:
    """``transformers`` ``generate`` with per-token log-probs of the processed distribution."""

    def __init__(self, policy: Policy, max_batch: int = 64) -> None:
        self.policy = policy
        self.max_batch = max_batch
        self.tokens_generated = 0
        self.seconds = 0.0

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int | None = None) -> list[Generation]:
        if seed is not None:
            torch.manual_seed(seed)
        start = time.perf_counter()
        out: list[Generation] = []
        for i in range(0, len(prompts), self.max_batch):
            out.extend(self._generate_chunk(prompts[i : i + self.max_batch], params))
        self.seconds += time.perf_counter() - start
        self.tokens_generated += sum(len(g.response_ids) for g in out)
        return out

    @torch.inference_mode()
    def _generate_chunk(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        model, tok = self.policy.model, self.policy.tokenizer
        B, P = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, P), tok.pad_id, dtype=torch.long)
        attn = torch.zeros((B, P), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
            attn[i, P - len(p) :] = 1
        kwargs = dict(do_sample=False) if params.greedy else dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        res = model.generate(
            input_ids=ids, attention_mask=attn, max_new_tokens=params.max_new_tokens,
            eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
            output_scores=True, return_dict_in_generate=True, **kwargs,
        )
        scores = model.compute_transition_scores(res.sequences, res.scores, normalize_logits=True)  # (B, N)
        result = []
        for i in range(B):
            ids_i = res.sequences[i, P:].tolist()
            n = ids_i.index(tok.eos_id) + 1 if tok.eos_id in ids_i else len(ids_i)
            result.append(Generation(ids_i[:n], scores[i, :n].float().tolist(), tok.eos_id in ids_i[:n]))
        return result


def make_engine(policy: Policy, max_batch: int | None = None) -> Engine:
    """The native engine for the tiny model, ``transformers.generate`` for everything else."""
    if policy.kind == "tiny":
        return TinyEngine(policy, max_batch or 1024)
    return HFEngine(policy, max_batch or 64)
