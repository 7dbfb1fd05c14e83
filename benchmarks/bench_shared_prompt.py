"""Learner forward + backward with a group's prompt computed once vs once per response.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_shared_prompt.py           # ~2 min
    PYTHONPATH=src .venv/bin/python benchmarks/bench_shared_prompt.py --short   # make bench, ~1 min

A GRPO batch holds G responses per prompt. ``Policy.response_logprobs`` on the tiny GPT runs each
distinct prompt once and gathers its keys/values for the rows that share it
(``offpolicy.policy.prefix``); the plain path runs every row's prompt again. Both give the same
log-probs and gradients (``tests/unit/test_prefix.py``). Here: token log-probs of 64 groups × G = 8
responses, a token-mean loss and ``backward()``, for prompt/response lengths from the quickstart's
(6 + 4) to long prompts (120 + 8), on the quickstart width (d_model 128, 2 layers, 4 heads) with
random weights. Interleaved rounds on idle cores, the fastest round kept (``common.interleaved``).

Writes ``benchmarks/results/shared_prompt.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine, markdown_table, summarize, wait_for_quiet, write_json  # noqa: E402

from offpolicy.experience import Experience, collate  # noqa: E402
from offpolicy.policy.model import build_tiny  # noqa: E402
from offpolicy.policy.tiny import TinyConfig  # noqa: E402

SHAPES = [(6, 4), (32, 8), (120, 8), (32, 96)]  # (prompt tokens, response tokens)


def make_batch(policy, groups: int, G: int, P: int, T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    V = policy.tokenizer.vocab_size
    exps = []
    for k in range(groups):
        prompt = torch.randint(4, V, (P,), generator=g).tolist()
        for _ in range(G):
            n = int(torch.randint(1, T + 1, (1,), generator=g))
            exps.append(Experience(prompt_ids=prompt, response_ids=torch.randint(4, V, (n,), generator=g).tolist(),
                                   reward=0.0, group_id=f"g{k}"))
    return collate(exps, policy.tokenizer.pad_id)


def step_fn(policy, batch, shared: bool):
    def run():
        policy.model.zero_grad(set_to_none=True)
        if shared:
            logp, _ = policy.response_logprobs(batch.input_ids, batch.attention_mask, batch.prompt_len)
        else:
            logits = policy.logits(batch.input_ids, batch.attention_mask)[:, batch.prompt_len - 1 : -1]
            logp = torch.log_softmax(logits.float(), -1).gather(-1, batch.response_ids[..., None])[..., 0]
        ((logp * batch.mask).sum() / batch.mask.sum()).backward()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--short", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    groups, G = 64, 8
    rows, results = [], []
    for P, T in SHAPES:
        policy = build_tiny(TinyConfig(d_model=128, n_layers=2, n_heads=4, max_len=P + T), seed=0)
        batch = make_batch(policy, groups, G, P, T)
        tokens = float(batch.attention_mask.sum())  # real tokens per batch (prompt + response, per row)
        wait_for_quiet(30.0)
        times = interleaved({"plain": step_fn(policy, batch, False), "shared": step_fn(policy, batch, True)},
                            rounds=3, seconds_per_round=1.0 if a.short else 3.0)
        stats = {k: summarize(v, 1.0) for k, v in times.items()}
        plain, shared = stats["plain"]["median_s"], stats["shared"]["median_s"]
        results.append({"prompt_tokens": P, "response_tokens_max": T, "rows": groups * G, "group_size": G,
                        "plain_s": plain, "shared_s": shared, "speedup": round(plain / shared, 2),
                        "row_tokens_per_s_plain": round(tokens / plain), "row_tokens_per_s_shared": round(tokens / shared),
                        "settled": bool(stats["plain"]["settled"] and stats["shared"]["settled"])})
        r = results[-1]
        rows.append([f"{P} + ≤{T}", f"{plain * 1000:.1f}", f"{shared * 1000:.1f}", f"{r['speedup']:.2f}×",
                     f"{r['row_tokens_per_s_plain']:,}", f"{r['row_tokens_per_s_shared']:,}",
                     "" if r["settled"] else "*"])
    payload = {"benchmark": "shared_prompt", "short": a.short, "machine": machine(), "threads": a.threads,
               "command": "PYTHONPATH=src .venv/bin/python benchmarks/bench_shared_prompt.py"
                          + (" --short" if a.short else ""),
               "model": {"d_model": 128, "n_layers": 2, "n_heads": 4}, "results": results}
    path = write_json("shared_prompt", payload)
    print(markdown_table(["prompt + response tokens", "plain ms", "shared ms", "speed-up", "row tokens/s plain",
                          "row tokens/s shared", "unsettled"], rows))
    print(f"[bench_shared_prompt] wrote {path}")


if __name__ == "__main__":
    main()
