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
    scaled = logits if params.temperature == 1.0 else logits / params.temperature  # x / 1.0 == x: skip the op
    logprobs = F.log_softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_lp, order = logprobs.sort(dim=-1, descending=True)
        cum = sorted_lp.exp().cumsum(-1)
        drop_sorted = (cum - sorted_lp.exp()) >= params.top_p  # keep the smallest prefix reaching top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logprobs = F.log_softmax(logprobs.masked_fill(drop, float("-inf")), dim=-1)
    tokens = torch.multinomial(logprobs.exp(), 1, generator=generator)  # (B, 1)
    return tokens.squeeze(-1), logprobs.gather(-1, tokens).squeeze(-1)


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
        P, N = max(len(p) for p in prompts), params.max_new_tokens
        if P + N > model.cfg.max_len:  # once per chunk: every decode step stays below P + N
            raise ValueError(f"prompt ({P}) + max_new_tokens ({N}) exceeds the model's max_len={model.cfg.max_len}")
        was_training = model.training
        if was_training:  # model.eval() walks every module: ~0.1 ms, so only when it changes something
            model.eval()
        try:
            if all(len(p) == P for p in prompts):
                tokens, logps, lengths = _sample_unpadded(model, prompts, params, gen, tok.eos_id)
            else:
                tokens, logps, lengths = _sample_padded(model, prompts, params, gen, tok.pad_id, tok.eos_id)
        finally:
            if was_training:
                model.train()
        return _generations(tokens, logps, lengths, tok.eos_id)


def _sample_unpadded(model, prompts: list[list[int]], params: SamplingParams, gen, eos_id: int):
    """Fast path for prompts of one length: no masks, no position ids (the model derives both from the cache).

    Rows that have finished keep decoding their own samples; :func:`_lengths` cuts them off.
    """
    ids = torch.tensor(prompts, dtype=torch.long)  # (B, P)
    B, P = ids.shape
    cache = KVCache(model.cfg, B, P + params.max_new_tokens, next(model.parameters()).dtype, ids.device)
    logits = model(ids, cache=cache)[:, -1]  # (B, V), causal prefill

    def step(nxt: torch.Tensor, t: int) -> torch.Tensor:
        return model(nxt[:, None], cache=cache)[:, -1]  # one token at position P + t sees the whole cache

    return _sample_loop(logits, step, params, gen, eos_id)


def _sample_padded(model, prompts: list[list[int]], params: SamplingParams, gen, pad_id: int, eos_id: int):
    """Left-padded prompts of mixed lengths: a key mask over cache + new tokens and per-row positions."""
    B, P, N = len(prompts), max(len(p) for p in prompts), params.max_new_tokens
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts], dtype=torch.long)  # (B, P)
    n_prompt = torch.tensor([len(p) for p in prompts])  # (B,) real prompt tokens = position of the first new one
    attn = torch.arange(P + N)[None, :] >= (P - n_prompt)[:, None]  # (B, P+N): real prompt and every new token
    cache = KVCache(model.cfg, B, P + N, next(model.parameters()).dtype, ids.device)
    logits = model(ids, attention_mask=attn[:, :P], cache=cache)[:, -1]  # (B, V)

    def step(nxt: torch.Tensor, t: int) -> torch.Tensor:
        pos = (n_prompt + t)[:, None]  # (B, 1)
        return model(nxt[:, None], attention_mask=attn[:, : P + t + 1], position_ids=pos, cache=cache)[:, -1]

    return _sample_loop(logits, step, params, gen, eos_id)


def _sample_loop(logits: torch.Tensor, step, params: SamplingParams, gen, eos_id: int):
    """Sample up to ``max_new_tokens`` per row, feeding each token back through ``step(tokens, t) -> logits``.

    Stops early once every row has produced EOS. Returns tokens and log-probs (B, T) for the T steps
    taken (entries after a row's EOS are not meaningful) and each row's length (B,).
    """
    B, N = logits.shape[0], params.max_new_tokens
    tokens = torch.empty((B, N), dtype=torch.long)
    logps = torch.empty((B, N))
    done = torch.zeros(B, dtype=torch.bool)
    for t in range(N):
        nxt, lp = sample_tokens(logits, params, gen)  # (B,), (B,)
        tokens[:, t], logps[:, t] = nxt, lp
        done |= nxt == eos_id
        if t == N - 1 or bool(done.all()):
            break
        logits = step(nxt, t)
    tokens, logps = tokens[:, : t + 1], logps[:, : t + 1]
    return tokens, logps, _lengths(tokens, eos_id)


def _lengths(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Response length of each row of ``tokens`` (B, T): up to and including the first EOS, else T."""
    is_eos = tokens == eos_id  # (B, T)
    first = is_eos.int().argmax(-1)  # index of the first EOS (0 when there is none)
    return torch.where(is_eos.any(-1), first + 1, tokens.shape[1])


def _generations(tokens: torch.Tensor, logps: torch.Tensor, lengths: torch.Tensor, eos_id: int) -> list[Generation]:
    """One :class:`Generation` per row, through a single ``.tolist()`` of each tensor."""
    return [
        Generation(ids[:n], lps[:n], ids[n - 1] == eos_id)
        for ids, lps, n in zip(tokens.tolist(), logps.tolist(), lengths.tolist())
    ]


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
