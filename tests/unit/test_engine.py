"""The native KV-cache engine: its behaviour log-probs, determinism, EOS, padding and sampling params."""

from __future__ import annotations

import math

import pytest
import torch

from offpolicy.experience import Experience, collate
from offpolicy.policy.model import Policy
from offpolicy.rollout.engines import (
    Generation, SamplingParams, TinyEngine, _lengths, _sample_padded, _sample_unpadded, make_engine, sample_tokens,
)

PROMPTS = ["12+345=", "7+8=", "99+1=", "3+40="]


def _prompts(policy):
    return [policy.tokenizer.encode(p) for p in PROMPTS]


def _learner_logprobs(policy, prompts, gens, temperature):
    """What the learner would compute for the same tokens: Policy.response_logprobs on the collated batch."""
    exps = [Experience(p, g.response_ids, behavior_logprobs=g.logprobs) for p, g in zip(prompts, gens)]
    b = collate(exps, policy.tokenizer.pad_id)
    with torch.no_grad():
        logp, _ = policy.response_logprobs(b.input_ids, b.attention_mask, b.prompt_len, temperature)
    return logp * b.mask, b.behavior_logp * b.mask


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_behaviour_logprobs_equal_the_learners_logprobs(tiny_policy, temperature):
    engine = TinyEngine(tiny_policy)
    prompts = _prompts(tiny_policy) * 2
    gens = engine.sample(prompts, SamplingParams(max_new_tokens=8, temperature=temperature), seed=0)
    learner, behaviour = _learner_logprobs(tiny_policy, prompts, gens, temperature)
    assert torch.allclose(learner, behaviour, atol=1e-5)
    assert (behaviour <= 0).all()


def test_greedy_logprobs_are_at_temperature_one(tiny_policy):
    engine = TinyEngine(tiny_policy)
    prompts = _prompts(tiny_policy)
    gens = engine.sample(prompts, SamplingParams(max_new_tokens=6, greedy=True, temperature=0.5))
    learner, behaviour = _learner_logprobs(tiny_policy, prompts, gens, 1.0)
    assert torch.allclose(learner, behaviour, atol=1e-5)


def test_greedy_is_deterministic_and_picks_the_argmax(tiny_policy):
    engine = TinyEngine(tiny_policy)
    prompts = _prompts(tiny_policy)
    params = SamplingParams(max_new_tokens=6, greedy=True)
    a = engine.sample(prompts, params, seed=1)
    b = engine.sample(prompts, params, seed=2)
    assert [g.response_ids for g in a] == [g.response_ids for g in b]
    # every greedy token is the argmax of the full-sequence forward pass
    tok = tiny_policy.tokenizer
    for p, g in zip(prompts, a):
        seq = torch.tensor([p + g.response_ids])
        with torch.no_grad():
            logits = tiny_policy.model(seq)[0]
        for t, token in enumerate(g.response_ids):
            assert int(logits[len(p) + t - 1].argmax()) == token
        assert g.finished == (tok.eos_id in g.response_ids)


def test_seeds_reproduce_and_differ(tiny_policy):
    engine = TinyEngine(tiny_policy)
    prompts = _prompts(tiny_policy) * 4
    params = SamplingParams(max_new_tokens=8)
    a = engine.sample(prompts, params, seed=7)
    b = engine.sample(prompts, params, seed=7)
    c = engine.sample(prompts, params, seed=8)
    assert [g.response_ids for g in a] == [g.response_ids for g in b]
    assert [g.logprobs for g in a] == [g.logprobs for g in b]
    assert [g.response_ids for g in a] != [g.response_ids for g in c]


def test_generation_leaves_the_global_rng_and_train_mode_alone(tiny_policy):
    tiny_policy.model.train()
    state = torch.get_rng_state()
    TinyEngine(tiny_policy).sample(_prompts(tiny_policy), SamplingParams(max_new_tokens=3), seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert tiny_policy.model.training


class EosFrom(torch.nn.Module):
    """The tiny GPT, except that from position ``start`` on EOS is certain and before it impossible."""

    def __init__(self, model, eos_id: int, start: int) -> None:
        super().__init__()
        self.inner, self.cfg, self.eos_id, self.start = model, model.cfg, eos_id, start

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        past = cache.len if cache is not None else 0
        logits = self.inner(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache)
        if attention_mask is None and position_ids is None:  # unpadded rows: positions follow the cache
            position_ids = torch.arange(past, past + input_ids.shape[1])[None]
        elif position_ids is None:  # the padded prompt pass: positions as TinyGPT derives them
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        logits[..., self.eos_id] = torch.where(position_ids >= self.start, 1e4, -1e4)
        return logits


def test_eos_stops_a_row_and_the_others_continue(tiny_policy):
    tok = tiny_policy.tokenizer
    policy = Policy(EosFrom(tiny_policy.model, tok.eos_id, start=5), tok, "tiny")
    engine = TinyEngine(policy)
    short, long_ = tok.encode("1+1="), tok.encode("100+200=")  # 4 and 8 tokens
    gens = engine.sample([short, long_, short], SamplingParams(max_new_tokens=6, greedy=True))
    # the long prompt ends past position 5: EOS at once; a short row's tokens sit at positions 4, 5, 6, and the
    # logits at position 5 say EOS, so it stops after 3 tokens while the other rows of the batch carry on
    assert gens[1] == Generation([tok.eos_id], [pytest.approx(0.0)], True, [0])
    for g in (gens[0], gens[2]):
        assert len(g.response_ids) == len(g.logprobs) == 3 and g.finished
        assert g.response_ids[-1] == tok.eos_id and tok.eos_id not in g.response_ids[:-1]
    assert engine.tokens_generated == 7
    sampled = engine.sample([short, long_], SamplingParams(max_new_tokens=6), seed=0)
    assert [len(g.response_ids) for g in sampled] == [3, 1] and all(g.finished for g in sampled)


def test_rows_without_eos_run_to_max_new_tokens(tiny_policy):
    tok = tiny_policy.tokenizer
    policy = Policy(EosFrom(tiny_policy.model, tok.eos_id, start=100), tok, "tiny")
    gens = TinyEngine(policy).sample([tok.encode("1+1=")], SamplingParams(max_new_tokens=4), seed=0)
    assert len(gens[0].response_ids) == 4 and not gens[0].finished


def test_left_padding_gives_the_same_greedy_result_as_each_prompt_alone(tiny_policy):
    engine = TinyEngine(tiny_policy)
    prompts = _prompts(tiny_policy)
    assert len({len(p) for p in prompts}) > 1
    params = SamplingParams(max_new_tokens=8, greedy=True)
    batched = engine.sample(prompts, params)
    for p, g in zip(prompts, batched):
        (alone,) = engine.sample([p], params)
        assert alone.response_ids == g.response_ids
        assert alone.logprobs == pytest.approx(g.logprobs, abs=1e-5)


def test_chunking_by_max_batch_gives_the_same_greedy_result(tiny_policy):
    prompts = _prompts(tiny_policy)
    params = SamplingParams(max_new_tokens=5, greedy=True)
    whole = TinyEngine(tiny_policy).sample(prompts, params)
    chunked = TinyEngine(tiny_policy, max_batch=3).sample(prompts, params)
    assert [g.response_ids for g in whole] == [g.response_ids for g in chunked]


def test_counters_and_max_len(tiny_policy):
    engine = TinyEngine(tiny_policy)
    gens = engine.sample(_prompts(tiny_policy), SamplingParams(max_new_tokens=4), seed=0)
    assert engine.tokens_generated == sum(len(g.response_ids) for g in gens) and engine.seconds > 0
    with pytest.raises(ValueError, match="max_len"):
        engine.sample([[5] * 40], SamplingParams(max_new_tokens=9))


def test_make_engine_and_tiny_engine_kind_check(tiny_policy):
    assert isinstance(make_engine(tiny_policy), TinyEngine)
    tiny_policy.kind = "hf"
    with pytest.raises(ValueError, match="HFEngine"):
        TinyEngine(tiny_policy)


# ---- sampling parameters and top-p ------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": -0.1}, "top_p"),
    ({"temperature": 0.0}, "temperature"), ({"max_new_tokens": 0}, "max_new_tokens"),
])
def test_sampling_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_top_p_keeps_the_smallest_prefix_reaching_p_and_renormalises():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        token, lp = sample_tokens(logits, SamplingParams(top_p=0.75), gen)
        seen.add(int(token))
        # kept {0.5, 0.3}: renormalised to 0.625 / 0.375
        assert lp.item() == pytest.approx(math.log({0: 0.625, 1: 0.375}[int(token)]), abs=1e-5)
    assert seen == {0, 1}
    # p below the first token's probability keeps only it
    token, lp = sample_tokens(logits, SamplingParams(top_p=0.45), gen)
    assert int(token) == 0 and lp.item() == pytest.approx(0.0, abs=1e-6)


def test_top_p_behaviour_logprobs_are_under_the_truncated_distribution(tiny_policy):
    engine = TinyEngine(tiny_policy)
    prompts = _prompts(tiny_policy)
    gens = engine.sample(prompts, SamplingParams(max_new_tokens=6, top_p=0.3), seed=0)
    learner, behaviour = _learner_logprobs(tiny_policy, prompts, gens, 1.0)
    # renormalising over the nucleus raises every sampled token's log-prob above the full softmax's
    assert (behaviour >= learner - 1e-5).all() and (behaviour > learner + 1e-3).any()


def test_generation_dataclass_fields():
    g = Generation([5, 2], [-0.1, -0.2], True)
    assert g.response_ids == [5, 2] and g.finished


# ---- the unpadded fast path ---------------------------------------------------------------------
def _equal_length_prompts(policy):
    prompts = [policy.tokenizer.encode(p) for p in ["12+34=", "7+890=", "99+11=", "3+400="]] * 2
    assert len({len(p) for p in prompts}) == 1
    return prompts


class EosBoost(torch.nn.Module):
    """The tiny GPT with ``boost`` added to the EOS logit: sampled rows stop after different numbers of tokens."""

    def __init__(self, model, eos_id: int, boost: float = 3.5) -> None:
        super().__init__()
        self.inner, self.cfg, self.eos_id, self.boost = model, model.cfg, eos_id, boost

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        logits = self.inner(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache)
        logits[..., self.eos_id] += self.boost
        return logits


def _likely_eos(policy):
    """The tiny policy with EOS at roughly 1 in 4 per token (the untrained model is close to uniform)."""
    return Policy(EosBoost(policy.model, policy.tokenizer.eos_id), policy.tokenizer, "tiny")


@pytest.mark.parametrize("eos_likely", [False, True])
@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=8, temperature=0.7),
    SamplingParams(max_new_tokens=8, top_p=0.5), SamplingParams(max_new_tokens=8, greedy=True),
])
def test_unpadded_fast_path_samples_what_the_padded_path_samples(tiny_policy, params, eos_likely):
    policy = _likely_eos(tiny_policy) if eos_likely else tiny_policy
    model, tok = policy.model.eval(), policy.tokenizer
    prompts = _equal_length_prompts(policy)
    with torch.inference_mode():
        fast = _sample_unpadded(model, prompts, params, torch.Generator().manual_seed(3), tok.eos_id)
        padded = _sample_padded(model, prompts, params, torch.Generator().manual_seed(3), tok.pad_id, tok.eos_id)
    (f_tok, f_lp, f_len), (p_tok, p_lp, p_len) = fast, padded
    assert torch.equal(f_len, p_len)
    if eos_likely and not params.greedy:
        assert len(set(f_len.tolist())) > 1  # rows stopped at different steps, some before the last
    for i, n in enumerate(f_len.tolist()):
        assert f_tok[i, :n].tolist() == p_tok[i, :n].tolist()
        assert torch.allclose(f_lp[i, :n], p_lp[i, :n], atol=1e-5)


def test_generate_takes_the_fast_path_only_for_equal_lengths(tiny_policy, monkeypatch):
    import offpolicy.rollout.engines as engines

    calls = []
    for name in ("_sample_unpadded", "_sample_padded"):
        real = getattr(engines, name)
        monkeypatch.setattr(engines, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    engine = TinyEngine(tiny_policy)
    params = SamplingParams(max_new_tokens=3)
    engine.sample(_equal_length_prompts(tiny_policy), params, seed=0)
    engine.sample(_prompts(tiny_policy), params, seed=0)
    engine.sample([tiny_policy.tokenizer.encode("1+1=")], params, seed=0)
    assert calls == ["_sample_unpadded", "_sample_padded", "_sample_unpadded"]


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=8, temperature=0.6),
                                    SamplingParams(max_new_tokens=8, temperature=1.7)])
def test_fast_path_logprobs_equal_the_learners_logprobs(tiny_policy, params):
    prompts = _equal_length_prompts(tiny_policy)
    gens = TinyEngine(tiny_policy).sample(prompts, params, seed=0)
    learner, behaviour = _learner_logprobs(tiny_policy, prompts, gens, params.temperature)
    assert torch.allclose(learner, behaviour, atol=1e-5)
    assert (behaviour < 0).any()


def test_fast_path_eos_lengths_and_finished_flags(tiny_policy):
    policy = _likely_eos(tiny_policy)
    eos = policy.tokenizer.eos_id
    # distinct prompts: the learner's shared-prompt path (rows with one prompt) needs the bare TinyGPT, not EosBoost
    prompts = [policy.tokenizer.encode(f"{10 + i}+{60 + i}=") for i in range(32)]
    engine = TinyEngine(policy)
    gens = engine.sample(prompts, SamplingParams(max_new_tokens=8), seed=0)
    assert {g.finished for g in gens} == {True, False}
    for g in gens:
        assert len(g.response_ids) == len(g.logprobs) <= 8
        assert g.finished == (g.response_ids[-1] == eos)
        assert eos not in g.response_ids[:-1]
        assert g.finished or len(g.response_ids) == 8
    assert engine.tokens_generated == sum(len(g.response_ids) for g in gens)
    learner, behaviour = _learner_logprobs(policy, prompts, gens, 1.0)
    assert torch.allclose(learner, behaviour, atol=1e-5)


def test_fast_path_greedy_picks_the_argmax_and_respects_max_len(tiny_policy):
    prompts = _equal_length_prompts(tiny_policy)
    gens = TinyEngine(tiny_policy).sample(prompts, SamplingParams(max_new_tokens=6, greedy=True))
    for p, g in zip(prompts, gens):
        with torch.no_grad():
            logits = tiny_policy.model(torch.tensor([p + g.response_ids]))[0]
        assert [int(logits[len(p) + t - 1].argmax()) for t in range(len(g.response_ids))] == g.response_ids
    max_len = tiny_policy.model.cfg.max_len
    with pytest.raises(ValueError, match="max_len"):
        TinyEngine(tiny_policy).sample([[5] * (max_len - 3)] * 2, SamplingParams(max_new_tokens=4))
    (full,) = TinyEngine(tiny_policy).sample([[5] * (max_len - 4)], SamplingParams(max_new_tokens=4), seed=0)
    assert len(full.response_ids) <= 4


def test_temperature_one_skips_no_behaviour():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    a = sample_tokens(logits, SamplingParams(temperature=1.0), torch.Generator().manual_seed(1))
    b = sample_tokens(logits / 1.0, SamplingParams(temperature=1.0 + 1e-12), torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1])


def test_lengths_cut_at_the_first_eos():
    tokens = torch.tensor([[5, 2, 2, 7], [5, 6, 7, 8], [2, 9, 9, 9]])
    assert _lengths(tokens, eos_id=2).tolist() == [2, 4, 1]
