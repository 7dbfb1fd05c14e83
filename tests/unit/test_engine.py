"""The native KV-cache engine: its behaviour log-probs, determinism, EOS, padding and sampling params."""

from __future__ import annotations

import math

import pytest
import torch

from offpolicy.experience import Experience, collate
from offpolicy.policy.model import Policy
from offpolicy.rollout.engines import Generation, SamplingParams, TinyEngine, make_engine, sample_tokens

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
    gens = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=temperature), seed=0)
    learner, behaviour = _learner_logprobs(tiny_policy, prompts, gens, temperature)
    assert torch.allclose(learner, behaviour, atol=1e-5)
    assert (behaviour <= 0).all()


def test_greedy_logprobs_are_at_temperature_one(tiny_policy):
    engine = TinyEngine(tiny_policy)
    prompts = _prompts(tiny_policy)
    gens = engine.generate(prompts, SamplingParams(max_new_tokens=6, greedy=True, temperature=0.5))
    learner, behaviour = _learner_logprobs(tiny_policy, prompts, gens, 1.0)
    assert torch.allclose(learner, behaviour, atol=1e-5)


def test_greedy_is_deterministic_and_picks_the_argmax(tiny_policy):
    engine = TinyEngine(tiny_policy)
    prompts = _prompts(tiny_policy)
    params = SamplingParams(max_new_tokens=6, greedy=True)
    a = engine.generate(prompts, params, seed=1)
    b = engine.generate(prompts, params, seed=2)
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
    a = engine.generate(prompts, params, seed=7)
    b = engine.generate(prompts, params, seed=7)
    c = engine.generate(prompts, params, seed=8)
    assert [g.response_ids for g in a] == [g.response_ids for g in b]
    assert [g.logprobs for g in a] == [g.logprobs for g in b]
    assert [g.response_ids for g in a] != [g.response_ids for g in c]


def test_generation_leaves_the_global_rng_and_train_mode_alone(tiny_policy):
    tiny_policy.model.train()
    state = torch.get_rng_state()
    TinyEngine(tiny_policy).generate(_prompts(tiny_policy), SamplingParams(max_new_tokens=3), seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert tiny_policy.model.training


class EosFrom(torch.nn.Module):
    """The tiny GPT, except that from position ``start`` on EOS is certain and before it impossible."""

    def __init__(self, model, eos_id: int, start: int) -> None:
        super().__init__()
        self.inner, self.cfg, self.eos_id, self.start = model, model.cfg, eos_id, start

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        logits = self.inner(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache)
        if position_ids is None:  # the prompt pass: positions as TinyGPT derives them
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        logits[..., self.eos_id] = torch.where(position_ids >= self.start, 1e4, -1e4)
        return logits


def test_eos_stops_a_row_and_the_others_continue(tiny_policy):
    tok = tiny_policy.tokenizer
    policy = Policy(EosFrom(tiny_policy.model, tok.eos_id, start=5), tok, "tiny")
    engine = TinyEngine(policy)
    short, long_ = tok.encode("1+1="), tok.encode("100+200=")  # 4 and 8 tokens
    gens = engine.generate([short, long_, short], SamplingParams(max_new_tokens=6, greedy=True))
    # the long prompt ends past position 5: EOS at once; a short row's tokens sit at positions 4, 5, 6, and the
    # logits at position 5 say EOS, so it stops after 3 tokens while the other rows of the batch carry on
    assert gens[1] == Generation([tok.eos_id], [pytest.approx(0.0)], True)
    for g in (gens[0], gens[2]):
        assert len(g.response_ids) == len(g.logprobs) == 3 and g.finished
        assert g.response_ids[-1] == tok.eos_id and tok.eos_id not in g.response_ids[:-1]
    assert engine.tokens_generated == 7
    sampled = engine.generate([short, long_], SamplingParams(max_new_tokens=6), seed=0)
    assert [len(g.response_ids) for g in sampled] == [3, 1] and all(g.finished for g in sampled)


def test_rows_without_eos_run_to_max_new_tokens(tiny_policy):
    tok = tiny_policy.tokenizer
    policy = Policy(EosFrom(tiny_policy.model, tok.eos_id, start=100), tok, "tiny")
    gens = TinyEngine(policy).generate([tok.encode("1+1=")], SamplingParams(max_new_tokens=4), seed=0)
    assert len(gens[0].response_ids) == 4 and not gens[0].finished


def test_left_padding_gives_the_same_greedy_result_as_each_prompt_alone(tiny_policy):
    engine = TinyEngine(tiny_policy)
    prompts = _prompts(tiny_policy)
    assert len({len(p) for p in prompts}) > 1
    params = SamplingParams(max_new_tokens=8, greedy=True)
    batched = engine.generate(prompts, params)
    for p, g in zip(prompts, batched):
        (alone,) = engine.generate([p], params)
        assert alone.response_ids == g.response_ids
        assert alone.logprobs == pytest.approx(g.logprobs, abs=1e-5)


def test_chunking_by_max_batch_gives_the_same_greedy_result(tiny_policy):
    prompts = _prompts(tiny_policy)
    params = SamplingParams(max_new_tokens=5, greedy=True)
    whole = TinyEngine(tiny_policy).generate(prompts, params)
    chunked = TinyEngine(tiny_policy, max_batch=3).generate(prompts, params)
    assert [g.response_ids for g in whole] == [g.response_ids for g in chunked]


def test_counters_and_max_len(tiny_policy):
    engine = TinyEngine(tiny_policy)
    gens = engine.generate(_prompts(tiny_policy), SamplingParams(max_new_tokens=4), seed=0)
    assert engine.tokens_generated == sum(len(g.response_ids) for g in gens) and engine.seconds > 0
    with pytest.raises(ValueError, match="max_len"):
        engine.generate([[5] * 40], SamplingParams(max_new_tokens=9))


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
    gens = engine.generate(prompts, SamplingParams(max_new_tokens=6, top_p=0.3), seed=0)
    learner, behaviour = _learner_logprobs(tiny_policy, prompts, gens, 1.0)
    # renormalising over the nucleus raises every sampled token's log-prob above the full softmax's
    assert (behaviour >= learner - 1e-5).all() and (behaviour > learner + 1e-3).any()


def test_generation_dataclass_fields():
    g = Generation([5, 2], [-0.1, -0.2], True)
    assert g.response_ids == [5, 2] and g.finished
