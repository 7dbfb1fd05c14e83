"""The generation benchmark's reference loop computes what the tiny GPT computes, so its speed is a fair limit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
bench = pytest.importorskip("bench_generation")
common = pytest.importorskip("common")


@pytest.fixture
def model():
    from offpolicy.policy.model import build_tiny
    from offpolicy.policy.tiny import TinyConfig

    return build_tiny(TinyConfig(d_model=32, n_layers=2, n_heads=2, max_len=32), seed=0).model.eval()


def test_lean_forward_equals_the_model(model):
    ids = torch.randint(4, model.cfg.vocab_size, (3, 12))
    with torch.no_grad():
        assert torch.allclose(bench.lean_forward(model, ids, 0), model(ids), atol=1e-5)


def test_lean_kv_cache_steps_equal_the_full_forward(model):
    ids = torch.randint(4, model.cfg.vocab_size, (3, 12))
    cfg = model.cfg
    shape = (cfg.n_layers, 3, cfg.n_heads, 12, cfg.d_model // cfg.n_heads)
    kc, vc = torch.empty(shape), torch.empty(shape)
    with torch.no_grad():
        steps = [bench.lean_forward(model, ids[:, :8], 0, kc, vc)]
        steps += [bench.lean_forward(model, ids[:, t : t + 1], t, kc, vc) for t in range(8, 12)]
        assert torch.allclose(torch.cat(steps, 1), model(ids), atol=1e-5)


def test_limit_logprobs_are_the_models_logprobs(model):
    prompts = torch.randint(4, model.cfg.vocab_size, (4, 8))
    tokens, logps = bench.limit_generate(model, prompts, 5, torch.Generator().manual_seed(0))
    assert tokens.shape == logps.shape == (4, 5)
    with torch.no_grad():
        full = torch.log_softmax(model(torch.cat([prompts, tokens], 1)), -1)[:, 7:-1]  # (4, 5, V)
    assert torch.allclose(full.gather(-1, tokens[..., None]).squeeze(-1), logps, atol=1e-5)


def test_fixed_length_policy_never_stops_early(model):
    from offpolicy.policy.model import Policy
    from offpolicy.policy.tokenizer import CharTokenizer
    from offpolicy.rollout.engines import SamplingParams, TinyEngine

    with torch.no_grad():
        model.ln_f.bias.copy_(model.tok.weight[2] * 500)  # tied embeddings: EOS (id 2) becomes likely
    params = SamplingParams(max_new_tokens=6)
    normal = TinyEngine(Policy(model, CharTokenizer(), "tiny")).sample([[5, 6, 7]] * 8, params, seed=0)
    assert any(len(g.response_ids) < 6 for g in normal)  # the shipped tokenizer stops at EOS...
    fixed = TinyEngine(bench.fixed_length_policy(Policy(model, CharTokenizer(), "tiny")))
    assert all(len(g.response_ids) == 6 for g in fixed.sample([[5, 6, 7]] * 8, params, seed=0))  # ...this never


def test_summary_uses_the_least_disturbed_round():
    rounds = [[1.0, 1.2], [0.1, 0.1, 0.12], [0.11, 0.1]]
    s = common.summarize(rounds, work=10)
    assert s["per_s"] == pytest.approx(100.0) and s["settled"]
    assert not common.settled([[1.0], [0.1]])
