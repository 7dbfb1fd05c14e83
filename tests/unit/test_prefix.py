"""Shared-prompt forward: identical logits and gradients to the plain forward, fewer positions."""

from __future__ import annotations

import pytest
import torch

from offpolicy.experience import Experience, collate
from offpolicy.policy.model import build_tiny
from offpolicy.policy.prefix import shared_prompt_logits, unique_prompts
from offpolicy.policy.tiny import TinyConfig


def batch(policy, prompts: list[str], responses: list[str]):
    tok = policy.tokenizer
    exps = [Experience(prompt_ids=tok.encode(p), response_ids=tok.encode(r) + [tok.eos_id], reward=0.0)
            for p, r in zip(prompts, responses)]
    return collate(exps, tok.pad_id)


@pytest.fixture
def policy():
    return build_tiny(TinyConfig(d_model=32, n_layers=2, n_heads=4, max_len=32), seed=3)


@pytest.fixture
def grouped(policy):
    # three prompts of different lengths (left padding differs), groups of 3, 1 and 2, responses of mixed lengths
    prompts = ["12+34="] * 3 + ["7+8="] + ["100+5="] * 2
    responses = ["46", "4", "123", "15", "105", "1"]
    return batch(policy, prompts, responses)


def plain_logits(policy, b):
    return policy.logits(b.input_ids, b.attention_mask)[:, b.prompt_len - 1 : -1]


def test_unique_prompts_maps_rows_to_groups(policy, grouped):
    first, inverse = unique_prompts(grouped.input_ids[:, :grouped.prompt_len], grouped.attention_mask[:, :grouped.prompt_len])
    assert len(first) == 3
    groups = inverse.tolist()
    assert groups[0] == groups[1] == groups[2] and groups[4] == groups[5] and len(set(groups)) == 3
    assert all(inverse[first[u]] == u for u in range(3))  # each representative belongs to its group


def test_shared_logits_equal_the_plain_forward_on_real_tokens(policy, grouped):
    shared = shared_prompt_logits(policy.model, grouped.input_ids, grouped.attention_mask, grouped.prompt_len)
    plain = plain_logits(policy, grouped)
    m = grouped.mask.bool()  # only response positions that are real tokens are ever used
    assert shared.shape == plain.shape
    assert torch.allclose(shared[m], plain[m], atol=1e-5)


def test_shared_gradients_equal_the_plain_forward(policy, grouped):
    m = grouped.mask
    weights = torch.randn(grouped.mask.shape + (policy.tokenizer.vocab_size,), generator=torch.Generator().manual_seed(0))

    def grads(fn):
        policy.model.zero_grad()
        for p in policy.model.parameters():
            p.requires_grad_(True)
        ((fn() * weights).sum(-1) * m).sum().backward()
        return {n: p.grad.clone() for n, p in policy.model.named_parameters()}

    g_shared = grads(lambda: shared_prompt_logits(policy.model, grouped.input_ids, grouped.attention_mask,
                                                  grouped.prompt_len))
    g_plain = grads(lambda: plain_logits(policy, grouped))
    for name in g_plain:
        assert torch.allclose(g_shared[name], g_plain[name], atol=1e-5), name


def test_response_logprobs_take_the_shared_path_only_when_prompts_repeat(policy, grouped, monkeypatch):
    import offpolicy.policy.prefix as prefix

    calls = []
    original = prefix.shared_prompt_logits
    monkeypatch.setattr(prefix, "shared_prompt_logits", lambda *a, **k: calls.append(1) or original(*a, **k))
    logp, _ = policy.response_logprobs(grouped.input_ids, grouped.attention_mask, grouped.prompt_len)
    assert calls == [1]
    distinct = batch(policy, ["1+2=", "3+4="], ["3", "7"])
    policy.response_logprobs(distinct.input_ids, distinct.attention_mask, distinct.prompt_len)
    assert calls == [1]  # nothing to share: the plain forward
    plain = torch.log_softmax(plain_logits(policy, grouped).float(), -1).gather(-1, grouped.response_ids[..., None])[..., 0]
    m = grouped.mask.bool()
    assert torch.allclose(logp[m], plain[m], atol=1e-5)


def test_too_long_for_the_model_is_refused(policy):
    b = batch(policy, ["1+1="] * 2, ["2" * 30, "2"])
    with pytest.raises(ValueError, match="max_len"):
        shared_prompt_logits(policy.model, b.input_ids, b.attention_mask, b.prompt_len)
