"""Rollout engines: sample responses *and* the log-probability and policy version of every token.

- :class:`TinyEngine` — a batched KV-cache sampler for the built-in tiny GPT
  (one forward pass per generated token for the whole batch).
- :class:`HFEngine` — ``transformers``' ``generate`` for Hugging Face models.

The boundary (DESIGN.md, "The runtime"): an engine **owns its copy of the weights**.
It is built from a policy once (a deep copy), and from then on only
:meth:`load_weights(named_tensors, version) <TinyEngine.load_weights>` changes them;
it never reads the learner's live model. Every generated token carries the
``version`` of the weights that produced it — with in-flight weight swaps
(``on_chunk``, PipelineRL-style partial rollouts) the tokens of one response can
carry different versions. A :class:`Request` is one prompt with its ``n`` samples
(one GRPO group), so an engine with prefix sharing (vLLM's ``n=``) can use it.

Both report log-probs under the distribution actually sampled from (logits /
temperature, then top-p renormalisation) and count generated tokens and time,
so the runner can log ``rollout/tokens_per_s``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F

from offpolicy.config import TrainingDiverged
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


    def as_dict(self) -> dict:
        """The provenance record an experience keeps (``Experience.sampling``)."""
        if self.greedy:
            return {"greedy": True, "max_new_tokens": self.max_new_tokens}
        return {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens}


@dataclass
class Generation:
    response_ids: list[int]  # includes the EOS token when the model stopped by itself
    logprobs: list[float]  # one per response token, under the sampling distribution
    finished: bool  # True if the model emitted EOS
    versions: list[int] = field(default_factory=list)  # policy version of the weights behind each token


@dataclass
class Request:
    """One prompt and how many samples of it to draw (a group): engines keep the ``n`` rows together."""

    prompt_ids: list[int]
    n: int = 1


ChunkHook = Callable[[], None]  # called between decode chunks; may call engine.load_weights (in-flight update)


class Engine(Protocol):
    name: str  # provenance: "tiny", "hf" (later "vllm", "sglang")
    version: int  # the policy version of the weights it holds
    dtype: str  # its weights' dtype, e.g. "float32"
    tokens_generated: int
    seconds: float

    def load_weights(self, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                     version: int) -> None: ...

    def generate(self, requests: Sequence[Request], params: SamplingParams, seed: int | None = None,
                 on_chunk: ChunkHook | None = None, chunk_tokens: int = 0) -> list[list[Generation]]: ...

    def sample(self, prompts: list[list[int]], params: SamplingParams, seed: int | None = None,
               on_chunk: ChunkHook | None = None, chunk_tokens: int = 0) -> list[Generation]: ...


class _OwnWeights:
    """What every engine shares: its own weights, their version, provenance, and groups as requests."""

    model: torch.nn.Module
    version: int = 0

    @torch.no_grad()
    def load_weights(self, named_tensors, version: int) -> None:
        """Copy ``named_tensors`` (a state dict, or (name, tensor) pairs) into the engine's weights.

        Every name must be one of the model's and every one of its tensors must be given (strict), so a
        partial or mismatched update fails instead of mixing two versions."""
        state = dict(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
        self.model.load_state_dict(state, strict=True)
        self.version = int(version)

    @property
    def dtype(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def generate(self, requests: Sequence[Request], params: SamplingParams, seed: int | None = None,
                 on_chunk: ChunkHook | None = None, chunk_tokens: int = 0) -> list[list[Generation]]:
        """``n`` samples of each request's prompt: one list of generations per request (a group)."""
        flat = [r.prompt_ids for r in requests for _ in range(r.n)]
        gens = self.sample(flat, params, seed=seed, on_chunk=on_chunk, chunk_tokens=chunk_tokens)
        out, i = [], 0
        for r in requests:
            out.append(gens[i : i + r.n])
            i += r.n
        return out


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
    try:
        tokens = torch.multinomial(logprobs.exp(), 1, generator=generator)  # (B, 1)
    except RuntimeError as e:  # NaN/inf probabilities: checked only on failure, so the good path never syncs
        if bool(torch.isfinite(logprobs.exp()).all()):  # another failure: not ours to rename
            raise
        raise TrainingDiverged("sampling: the policy's next-token probabilities are not finite: its weights "
                               "have diverged (e.g. rl.optim.lr too high, or a sampling.temperature so low "
                               "that the logits overflow)") from None
    return tokens.squeeze(-1), logprobs.gather(-1, tokens).squeeze(-1)


class TinyEngine(_OwnWeights):
    """Batched KV-cache sampler for :class:`~offpolicy.policy.tiny.TinyGPT`, on its own copy of the weights."""

    name = "tiny"

    def __init__(self, policy: Policy, max_batch: int = 1024, version: int = 0) -> None:
        if policy.kind != "tiny":
            raise ValueError("TinyEngine runs the built-in tiny model; use HFEngine for Hugging Face models")
        self.model = copy.deepcopy(policy.model).eval()  # the engine's own weights (never the learner's)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.eos_id, self.pad_id = policy.tokenizer.eos_id, policy.tokenizer.pad_id
        self.max_batch = max_batch
        self.version = version
        self.tokens_generated = 0
        self.seconds = 0.0

    def sample(self, prompts: list[list[int]], params: SamplingParams, seed: int | None = None,
               on_chunk: ChunkHook | None = None, chunk_tokens: int = 0) -> list[Generation]:
        """One generation per prompt row. With ``on_chunk`` and ``chunk_tokens > 0``, ``on_chunk()`` runs
        after every ``chunk_tokens`` decode steps and may load new weights: the following tokens carry the
        new version, the KV cache of the earlier ones is kept (PipelineRL's in-flight update)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        start = time.perf_counter()
        out: list[Generation] = []
        for i in range(0, len(prompts), self.max_batch):
            out.extend(self._generate_chunk(prompts[i : i + self.max_batch], params, gen, on_chunk, chunk_tokens))
        self.seconds += time.perf_counter() - start
        self.tokens_generated += sum(len(g.response_ids) for g in out)
        return out

    @torch.inference_mode()
    def _generate_chunk(self, prompts: list[list[int]], params: SamplingParams, gen, on_chunk,
                        chunk_tokens: int) -> list[Generation]:
        model = self.model
        P, N = max(len(p) for p in prompts), params.max_new_tokens
        if P + N > model.cfg.max_len:  # once per chunk: every decode step stays below P + N
            raise ValueError(f"prompt ({P}) + max_new_tokens ({N}) exceeds the model's max_len={model.cfg.max_len}")
        hook = _ChunkHook(self, on_chunk, chunk_tokens)
        if all(len(p) == P for p in prompts):
            tokens, logps, lengths = _sample_unpadded(model, prompts, params, gen, self.eos_id, hook)
        else:
            tokens, logps, lengths = _sample_padded(model, prompts, params, gen, self.pad_id, self.eos_id, hook)
        return _generations(tokens, logps, lengths, self.eos_id, hook.versions)


class _ChunkHook:
    """Records the engine's version at every decode step, and calls ``on_chunk`` every ``chunk_tokens`` steps."""

    def __init__(self, engine: _OwnWeights, on_chunk: ChunkHook | None, chunk_tokens: int) -> None:
        self.engine, self.on_chunk, self.chunk = engine, on_chunk, chunk_tokens if on_chunk else 0
        self.versions: list[int] = []

    def sampled(self, t: int) -> None:
        """Token ``t`` was just sampled with the engine's current weights."""
        self.versions.append(self.engine.version)

    def before_next(self, t: int) -> None:
        """Between token ``t`` and ``t + 1``: the end of a chunk lets new weights in."""
        if self.chunk and (t + 1) % self.chunk == 0:
            self.on_chunk()


def _sample_unpadded(model, prompts: list[list[int]], params: SamplingParams, gen, eos_id: int, hook=None):
    """Fast path for prompts of one length: no masks, no position ids (the model derives both from the cache).

    Rows that have finished keep decoding their own samples; :func:`_lengths` cuts them off.
    """
    ids = torch.tensor(prompts, dtype=torch.long)  # (B, P)
    B, P = ids.shape
    cache = KVCache(model.cfg, B, P + params.max_new_tokens, next(model.parameters()).dtype, ids.device)
    logits = model(ids, cache=cache)[:, -1]  # (B, V), causal prefill

    def step(nxt: torch.Tensor, t: int) -> torch.Tensor:
        return model(nxt[:, None], cache=cache)[:, -1]  # one token at position P + t sees the whole cache

    return _sample_loop(logits, step, params, gen, eos_id, hook)


def _sample_padded(model, prompts: list[list[int]], params: SamplingParams, gen, pad_id: int, eos_id: int,
                   hook=None):
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

    return _sample_loop(logits, step, params, gen, eos_id, hook)


def _sample_loop(logits: torch.Tensor, step, params: SamplingParams, gen, eos_id: int, hook=None):
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
        if hook is not None:
            hook.sampled(t)
        done |= nxt == eos_id
        if t == N - 1 or bool(done.all()):
            break
        if hook is not None:
            hook.before_next(t)
        logits = step(nxt, t)
    tokens, logps = tokens[:, : t + 1], logps[:, : t + 1]
    return tokens, logps, _lengths(tokens, eos_id)


def _lengths(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Response length of each row of ``tokens`` (B, T): up to and including the first EOS, else T."""
    is_eos = tokens == eos_id  # (B, T)
    first = is_eos.int().argmax(-1)  # index of the first EOS (0 when there is none)
    return torch.where(is_eos.any(-1), first + 1, tokens.shape[1])


def _generations(tokens: torch.Tensor, logps: torch.Tensor, lengths: torch.Tensor, eos_id: int,
                 versions: list[int]) -> list[Generation]:
    """One :class:`Generation` per row, through a single ``.tolist()`` of each tensor."""
    return [
        Generation(ids[:n], lps[:n], ids[n - 1] == eos_id, versions[:n])
        for ids, lps, n in zip(tokens.tolist(), logps.tolist(), lengths.tolist())
    ]


class HFEngine(_OwnWeights):
    """``transformers`` ``generate`` with per-token log-probs of the processed distribution, on its own copy
    of the weights. Sampling runs inside ``torch.random.fork_rng``: a seed never reseeds torch's global RNG.
    In-flight weight swaps (``on_chunk``) are not supported by ``generate`` and raise."""

    name = "hf"

    def __init__(self, policy: Policy, max_batch: int = 64, version: int = 0) -> None:
        self.model = copy.deepcopy(policy.model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = policy.tokenizer
        self.max_batch = max_batch
        self.version = version
        self.tokens_generated = 0
        self.seconds = 0.0

    def sample(self, prompts: list[list[int]], params: SamplingParams, seed: int | None = None,
               on_chunk: ChunkHook | None = None, chunk_tokens: int = 0) -> list[Generation]:
        if on_chunk is not None and chunk_tokens:
            raise ValueError("HFEngine cannot swap weights inside transformers.generate: set "
                             "async.partial_rollout=false for Hugging Face models")
        start = time.perf_counter()
        out: list[Generation] = []
        devices = [] if next(self.model.parameters()).device.type == "cpu" else None
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):  # the global RNG is restored
            if seed is not None:
                torch.manual_seed(seed)
            for i in range(0, len(prompts), self.max_batch):
                out.extend(self._generate_chunk(prompts[i : i + self.max_batch], params))
        self.seconds += time.perf_counter() - start
        self.tokens_generated += sum(len(g.response_ids) for g in out)
        return out

    @torch.inference_mode()
    def _generate_chunk(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        model, tok = self.model, self.tokenizer
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
            result.append(Generation(ids_i[:n], scores[i, :n].float().tolist(), tok.eos_id in ids_i[:n],
                                     [self.version] * n))
        return result


def make_engine(policy: Policy, max_batch: int | None = None, version: int = 0) -> Engine:
    """The native engine for the tiny model, ``transformers.generate`` for everything else; each starts
    with a copy of ``policy``'s weights labelled ``version``."""
    if policy.kind == "tiny":
        return TinyEngine(policy, max_batch or 1024, version)
    return HFEngine(policy, max_batch or 64, version)
