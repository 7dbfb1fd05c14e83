"""Generation and learner tokens/s of the tiny model, against the machine's practical limit.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_generation.py            # full, ~6 min on 2 cores
    PYTHONPATH=src .venv/bin/python benchmarks/bench_generation.py --short    # `make bench`, ~2 min
    PYTHONPATH=src .venv/bin/python benchmarks/bench_generation.py --profile  # where TinyEngine spends its time

Generation: random prompts of 8 tokens, exactly 8 new tokens per row (EOS is disabled for every
contender, so all of them do the same work), multinomial sampling at temperature 1, batch 1, 16,
64 and 256, with 2 torch threads (the recipes' setting) and with 1. Three contenders on the same
weights / shapes:

- ``ours``    ``TinyEngine.generate`` (left-padding masks, behaviour log-probs, Generation objects);
- ``limit``   a minimal KV-cache loop written below: preallocated cache, ``F.linear`` /
              ``F.scaled_dot_product_attention`` on the TinyGPT's own weight tensors, no masks
              (all prompts have the same length), log-softmax + multinomial + gather per step.
              It is the practical limit of PyTorch eager mode on this CPU for this model;
- ``hf``      ``transformers`` ``GPT2LMHeadModel.generate`` (random weights, same width / depth /
              vocabulary / context, built in code, sdpa attention, ``top_k=0``, no scores returned).

Learner: a batch of B sequences (8 prompt + 8 response tokens, no padding), one optimizer step:
``ours`` = ``Policy.response_logprobs`` → token-mean loss → backward → grad-clip + AdamW step (the
project's ``optimizer_step``); ``update`` = a whole ``Learner.update`` with the quickstart's RL
settings (PPO clip vs behaviour log-probs, GRPO advantages, entropy and off-policy diagnostics);
``bare`` = the lean forward below → cross-entropy → backward → AdamW step.

Timing: each row first waits (up to its cap) for idle cores, then times the contenders in interleaved
rounds and reports the least disturbed round; rows whose rounds disagree by > 15% are measured once
more and flagged (``settled: false``). Two threads on two cores that another process also uses can
stall 10-100x; one thread degrades gracefully, which is why both are measured.

Writes ``benchmarks/results/generation.json``; ``generation_fraction_of_limit`` is the lowest
ours / limit ratio over both models at batch >= 64 with 2 threads.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine, markdown_table, summarize, wait_for_quiet, write_json  # noqa: E402

from offpolicy.config import RLConfig  # noqa: E402
from offpolicy.experience import Experience, collate  # noqa: E402
from offpolicy.policy.model import Policy, build_tiny  # noqa: E402
from offpolicy.policy.tiny import TinyConfig, TinyGPT  # noqa: E402
from offpolicy.rollout.engines import SamplingParams, TinyEngine  # noqa: E402
from offpolicy.train.learner import Learner, make_optimizer, optimizer_step  # noqa: E402

MODELS = {"d128_L2": dict(d_model=128, n_layers=2, n_heads=4), "d192_L3": dict(d_model=192, n_layers=3, n_heads=4)}
PROMPT_LEN, NEW_TOKENS, MAX_LEN = 8, 8, 32


# ---- the practical limit: a lean KV-cache loop on the TinyGPT's own weights ------------------
def lean_forward(model: TinyGPT, ids: torch.Tensor, start: int, kc: torch.Tensor | None = None,
                 vc: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, L, V) of ``ids`` (B, L) at positions start..start+L; fills the caches when given.

    No masks: every row has the same length, so attention is causal inside the new block and
    full over the cache.
    """
    B, L = ids.shape
    D, H = model.cfg.d_model, model.cfg.n_heads
    x = F.embedding(ids, model.tok.weight) + model.pos.weight[start : start + L]  # (B, L, D)
    for i, blk in enumerate(model.blocks):
        h = F.layer_norm(x, (D,), blk.ln1.weight, blk.ln1.bias)
        q, k, v = F.linear(h, blk.qkv.weight, blk.qkv.bias).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)
        if kc is not None:
            kc[i, :, :, start : start + L] = k
            vc[i, :, :, start : start + L] = v
            k, v = kc[i, :, :, : start + L], vc[i, :, :, : start + L]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1)  # (B, H, L, Dh)
        x = x + F.linear(y.transpose(1, 2).reshape(B, L, D), blk.proj.weight, blk.proj.bias)
        h = F.layer_norm(x, (D,), blk.ln2.weight, blk.ln2.bias)
        fc, out = blk.mlp[0], blk.mlp[2]
        x = x + F.linear(F.gelu(F.linear(h, fc.weight, fc.bias)), out.weight, out.bias)
    x = F.layer_norm(x, (D,), model.ln_f.weight, model.ln_f.bias)
    return x @ model.tok.weight.T


@torch.inference_mode()
def limit_generate(model: TinyGPT, prompts: torch.Tensor, n_new: int, gen: torch.Generator):
    """Sample ``n_new`` tokens for every row of ``prompts`` (B, P); returns tokens and log-probs (B, n_new)."""
    B, P = prompts.shape
    cfg = model.cfg
    shape = (cfg.n_layers, B, cfg.n_heads, P + n_new, cfg.d_model // cfg.n_heads)
    kc, vc = torch.empty(shape), torch.empty(shape)
    tokens, logps = torch.empty(B, n_new, dtype=torch.long), torch.empty(B, n_new)
    logits = lean_forward(model, prompts, 0, kc, vc)[:, -1]
    for t in range(n_new):
        lp = F.log_softmax(logits, dim=-1)  # (B, V)
        nxt = torch.multinomial(lp.exp(), 1, generator=gen)  # (B, 1)
        tokens[:, t : t + 1], logps[:, t : t + 1] = nxt, lp.gather(-1, nxt)
        if t < n_new - 1:
            logits = lean_forward(model, nxt, P + t, kc, vc)[:, -1]
    return tokens, logps


# ---- contenders ------------------------------------------------------------------------------
def build(spec: dict) -> tuple[Policy, torch.nn.Module]:
    """Our tiny policy and an equivalent randomly initialised GPT-2 (same width, depth, vocab, context)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    policy = build_tiny(TinyConfig(max_len=MAX_LEN, **spec), seed=0)
    policy.model.eval()
    hf_cfg = GPT2Config(vocab_size=policy.model.cfg.vocab_size, n_positions=MAX_LEN, n_embd=spec["d_model"],
                        n_layer=spec["n_layers"], n_head=spec["n_heads"], bos_token_id=None, eos_token_id=None,
                        pad_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(hf_cfg).eval()
    hf.generation_config.eos_token_id = None  # fixed-length generation, like the other contenders
    hf.generation_config.pad_token_id = 0
    return policy, hf


def fixed_length_policy(policy: Policy) -> Policy:
    """The same model with EOS disabled (id -1 is never sampled), so every row generates all tokens."""
    tok = copy.copy(policy.tokenizer)
    tok.eos_id = -1
    return Policy(policy.model, tok, policy.kind)


def generation_contenders(policy: Policy, hf, batch: int):
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, policy.model.cfg.vocab_size, (batch, PROMPT_LEN), generator=g)
    prompt_lists = prompts.tolist()
    engine = TinyEngine(fixed_length_policy(policy))
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0)
    attn = torch.ones_like(prompts)
    return {
        "ours": lambda: engine.sample(prompt_lists, params, seed=1),
        "limit": lambda: limit_generate(policy.model, prompts, NEW_TOKENS, torch.Generator().manual_seed(1)),
        "hf": lambda: hf.generate(input_ids=prompts, attention_mask=attn, do_sample=True, top_k=0, top_p=1.0,
                                  temperature=1.0, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS),
    }


def check_fixed_length(fns: dict, batch: int) -> None:
    """Every contender must really produce batch × NEW_TOKENS tokens (otherwise tokens/s would lie)."""
    assert sum(len(g.response_ids) for g in fns["ours"]()) == batch * NEW_TOKENS
    assert fns["limit"]()[0].shape == (batch, NEW_TOKENS)
    assert fns["hf"]().shape == (batch, PROMPT_LEN + NEW_TOKENS)


def measure(fns: dict, work: float, timing: dict) -> tuple[dict, dict]:
    """Wait for a quiet machine, time ``fns`` in interleaved rounds; measure again once if it did not settle."""
    for attempt in (1, 2):
        quiet, waited = wait_for_quiet(max_wait=timing["cap"])
        times = interleaved(fns, timing["rounds"], timing["seconds"] / timing["rounds"], max_seconds=timing["cap"])
        res = {k: summarize(v, work) for k, v in times.items()}
        meta = {"quiet_start": quiet, "waited_s": round(waited, 1), "attempts": attempt,
                "rounds": res["ours"]["rounds"], "settled": all(r["settled"] for r in res.values()),
                "worst_round_spread": round(max(r["round_spread"] for r in res.values()), 2)}
        if meta["settled"]:
            break
    return res, meta


def bench_generation(batches: list[int], timing: dict) -> list[dict]:
    rows = []
    for name, spec in MODELS.items():
        policy, hf = build(spec)
        for batch in batches:
            fns = generation_contenders(policy, hf, batch)
            check_fixed_length(fns, batch)
            res, meta = measure(fns, batch * NEW_TOKENS, timing)
            row = {"model": name, "params": policy.num_params(), "batch": batch, "threads": torch.get_num_threads(),
                   **{f"{k}_tok_s": round(r["per_s"]) for k, r in res.items()},
                   **{f"{k}_all_calls_tok_s": round(r["all_calls_per_s"]) for k, r in res.items()}, **meta}
            row["ours_over_limit"] = round(row["ours_tok_s"] / row["limit_tok_s"], 3)
            row["ours_over_hf"] = round(row["ours_tok_s"] / row["hf_tok_s"], 3)
            rows.append(row)
            print(f"  generation {name} B={batch} threads={row['threads']}: ours {row['ours_tok_s']:,} tok/s, "
                  f"limit {row['limit_tok_s']:,}, hf {row['hf_tok_s']:,} (ours/limit {row['ours_over_limit']:.2f}"
                  f"{'' if row['settled'] else ', did not settle'})", flush=True)
    return rows


# ---- learner ---------------------------------------------------------------------------------
def learner_batch(policy: Policy, batch: int):
    g = torch.Generator().manual_seed(0)
    V = policy.model.cfg.vocab_size
    ids = torch.randint(4, V, (batch, PROMPT_LEN + NEW_TOKENS), generator=g)
    rewards = torch.randint(0, 2, (batch,), generator=g).float()
    exps = [Experience(r[:PROMPT_LEN].tolist(), r[PROMPT_LEN:].tolist(), reward=float(rewards[i]),
                       behavior_logprobs=[-math.log(V)] * NEW_TOKENS, group_id=f"g{i // 8}")
            for i, r in enumerate(ids)]
    return ids, collate(exps, policy.tokenizer.pad_id)


def learner_contenders(spec: dict, batch: int):
    policy = build_tiny(TinyConfig(max_len=MAX_LEN, **spec), seed=0)
    ids, b = learner_batch(policy, batch)
    opt, sched = make_optimizer(policy.parameters(), RLConfig().optim, 10**6)

    def ours():
        logp, _ = policy.response_logprobs(b.input_ids, b.attention_mask, b.prompt_len)  # (B, T)
        loss = -(logp * b.mask).sum() / b.mask.sum()
        optimizer_step(policy, loss, opt, sched, grad_clip=1.0)

    learner = Learner(policy, RLConfig(loss="ppo_clip", old_logp="behavior", advantage="grpo"),
                      total_updates=10**6, max_len=NEW_TOKENS)

    bare_model = copy.deepcopy(policy.model)
    bare_opt = torch.optim.AdamW(bare_model.parameters(), lr=1e-4, fused=True)  # as make_optimizer

    def bare():
        logits = lean_forward(bare_model, ids, 0)[:, PROMPT_LEN - 1 : -1]  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, PROMPT_LEN:].reshape(-1))
        bare_opt.zero_grad(set_to_none=True)
        loss.backward()
        bare_opt.step()

    return {"ours": ours, "update": lambda: learner.update(b), "bare": bare}


def bench_learner(batches: list[int], timing: dict) -> list[dict]:
    rows = []
    for name, spec in MODELS.items():
        for batch in batches:
            fns = learner_contenders(spec, batch)
            work = batch * (PROMPT_LEN + NEW_TOKENS)  # tokens through forward + backward
            res, meta = measure(fns, work, timing)
            row = {"model": name, "batch": batch, "threads": torch.get_num_threads(), "tokens_per_step": work, **meta,
                   **{f"{k}_tok_s": round(r["per_s"]) for k, r in res.items()},
                   **{f"{k}_step_s": round(r["median_s"], 4) for k, r in res.items()}}
            row["ours_over_bare"] = round(row["ours_tok_s"] / row["bare_tok_s"], 3)
            row["update_over_bare"] = round(row["update_tok_s"] / row["bare_tok_s"], 3)
            rows.append(row)
            print(f"  learner {name} B={batch} threads={row['threads']}: ours {row['ours_tok_s']:,} tok/s, full update "
                  f"{row['update_tok_s']:,}, bare {row['bare_tok_s']:,} (ours/bare {row['ours_over_bare']:.2f})",
                  flush=True)
    return rows


# ---- profile ---------------------------------------------------------------------------------
def profile(batch: int = 256, model: str = "d128_L2") -> None:
    """Operator-level profile of TinyEngine vs the lean loop at one batch size."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    policy, hf = build(MODELS[model])
    fns = generation_contenders(policy, hf, batch)
    for name in ("ours", "limit"):
        for _ in range(3):
            fns[name]()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                fns[name]()
        print(f"\n=== {name}, {model}, batch {batch}, 10 calls ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--short", action="store_true", help="fewer repeats (for `make bench`)")
    ap.add_argument("--profile", action="store_true", help="print an operator profile and exit")
    ap.add_argument("--threads", default="2,1", help="torch thread counts to measure, comma-separated; the "
                    "first one gives generation_fraction_of_limit")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    if args.profile:
        torch.set_num_threads(threads[0])
        profile()
        return
    # seconds per row and contender, rounds, and a cap on the seconds one row may take (waiting + re-measuring)
    timing = dict(seconds=0.6, rounds=3, cap=10.0) if args.short else dict(seconds=2.4, rounds=4, cap=40.0)
    gen_rows, learn_rows = [], []
    for n in threads:
        torch.set_num_threads(n)
        gen_rows += bench_generation([1, 16, 64, 256], timing)
        learn_rows += bench_learner([64, 512], timing)
    fraction = {n: [r["ours_over_limit"] for r in gen_rows if r["batch"] >= 64 and r["threads"] == n] for n in threads}
    result = {
        "benchmark": "generation",
        "short": args.short,
        "machine": machine(),
        "setup": {"prompt_tokens": PROMPT_LEN, "new_tokens": NEW_TOKENS, "sampling": "multinomial, temperature 1",
                  "timing": "interleaved rounds after waiting for idle cores; tok/s at the median call of the "
                            "least disturbed round (all_calls_*: median over every call)", "threads": threads},
        "generation_fraction_of_limit": min(fraction[threads[0]]),
        "generation_fraction_of_limit_by_threads": {str(n): {"min": min(v), "mean": round(sum(v) / len(v), 3)}
                                                    for n, v in fraction.items()},
        "all_rows_settled": all(r["settled"] for r in gen_rows + learn_rows),
        "generation": gen_rows,
        "learner": learn_rows,
    }
    path = write_json("generation", result)  # --short writes the same file; its "short" field says which
    print(f"\nwrote {path}  generation_fraction_of_limit={result['generation_fraction_of_limit']}\n")
    def flag(r: dict) -> str:  # "*": the rounds disagreed even after a second attempt (other jobs were running)
        return "" if r["settled"] else " *"

    print(markdown_table(["model", "threads", "batch", "ours tok/s", "limit tok/s", "HF generate tok/s", "ours/limit",
                          "ours/HF"],
                         [[r["model"], r["threads"], r["batch"], f"{r['ours_tok_s']:,}", f"{r['limit_tok_s']:,}",
                           f"{r['hf_tok_s']:,}", f"{r['ours_over_limit']:.2f}{flag(r)}", f"{r['ours_over_hf']:.2f}"]
                          for r in gen_rows]))
    print()
    print(markdown_table(["model", "threads", "batch (seqs × 16 tok)", "ours tok/s", "full update tok/s", "bare tok/s",
                          "ours/bare", "update/bare"],
                         [[r["model"], r["threads"], r["batch"], f"{r['ours_tok_s']:,}", f"{r['update_tok_s']:,}",
                           f"{r['bare_tok_s']:,}", f"{r['ours_over_bare']:.2f}{flag(r)}",
                           f"{r['update_over_bare']:.2f}"] for r in learn_rows]))


if __name__ == "__main__":
    main()
