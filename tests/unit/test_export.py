"""The tiny GPT exported as a Hugging Face GPT-2 computes the same numbers, and its tokenizer the same ids."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from offpolicy.policy.export import export_hf, positions_from_mask, to_gpt2, to_hf_tokenizer  # noqa: E402
from offpolicy.policy.model import CheckpointError, build_tiny, load_policy  # noqa: E402
from offpolicy.policy.tiny import TinyConfig  # noqa: E402
from offpolicy.policy.tokenizer import CharTokenizer  # noqa: E402
from offpolicy.rollout.engines import HFEngine, SamplingParams, TinyEngine  # noqa: E402

TEXT = "12 + 34 =\n 46"


@pytest.fixture
def policy():
    """A tiny GPT with perturbed weights (biases and LayerNorms away from their init) so every mapping matters."""
    p = build_tiny(TinyConfig(d_model=32, n_layers=2, n_heads=2, max_len=24), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for q in p.model.parameters():
            q.add_(0.2 * torch.randn(q.shape, generator=g))
    return p


def left_padded(tok, texts):
    enc = [tok.encode(t) for t in texts]
    L = max(map(len, enc))
    ids = torch.full((len(enc), L), tok.pad_id, dtype=torch.long)
    mask = torch.zeros((len(enc), L), dtype=torch.bool)
    for i, e in enumerate(enc):
        ids[i, L - len(e):] = torch.tensor(e)
        mask[i, L - len(e):] = True
    return ids, mask


def test_exported_logits_equal_tiny_on_left_padded_batch(policy):
    ids, mask = left_padded(policy.tokenizer, ["12+34=", "7+5=", "98+76=17", "\n a"])
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    hf = to_gpt2(policy)
    with torch.no_grad():
        ours = policy.model(ids, attention_mask=mask, position_ids=pos)
        theirs = hf(input_ids=ids, attention_mask=mask.long(), position_ids=pos).logits
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert hf.config.activation_function == "gelu" and hf.config.n_positions == 24
    # padded positions are never read (real queries cannot see pad keys); compare every real one
    torch.testing.assert_close(theirs[mask], ours[mask], atol=1e-5, rtol=1e-5)
    assert (theirs[mask] - ours[mask]).abs().max() < 1e-5


def test_tokenizer_round_trip_and_ids():
    ours = CharTokenizer()
    hf = to_hf_tokenizer(ours)
    ids = hf.encode(TEXT, add_special_tokens=False)
    assert ids == ours.encode(TEXT)
    assert hf.decode(ids) == TEXT
    assert hf(TEXT)["input_ids"] == ours.encode(TEXT)  # no BOS/EOS added by default, like ours
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
    assert len(hf) == ours.vocab_size
    assert hf.encode("é", add_special_tokens=False) == [ours.unk_id]
    assert hf.decode(ids + [ours.eos_id, ours.pad_id], skip_special_tokens=True) == TEXT


def test_saved_folder_round_trips(policy, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    out = export_hf(policy, tmp_path / "hf")
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    for cls in (PreTrainedTokenizerFast, AutoTokenizer):
        tok = cls.from_pretrained(out)
        ids = tok.encode(TEXT, add_special_tokens=False)
        assert ids == policy.tokenizer.encode(TEXT)
        assert tok.decode(ids) == TEXT


def test_load_policy_gives_matching_hf_policy(policy, tmp_path):
    tiny_dir = tmp_path / "tiny"
    policy.save(tiny_dir)
    out = export_hf(tiny_dir, tmp_path / "hf")  # from a checkpoint folder
    hp = load_policy(out)
    assert hp.kind == "hf"
    assert hp.tokenizer.encode(TEXT) == policy.tokenizer.encode(TEXT)
    assert hp.tokenizer.decode(policy.tokenizer.encode(TEXT) + [2, 5]) == TEXT
    prompts = ["12+34=", "5+6=", "99+1="]
    responses = ["46", "11\n", "100"]
    ids, mask = left_padded(policy.tokenizer, prompts)
    P = ids.shape[1]
    resp = torch.tensor([policy.tokenizer.encode(r.ljust(3))[:3] for r in responses])
    full_ids = torch.cat([ids, resp], 1)
    full_mask = torch.cat([mask, torch.ones_like(resp, dtype=torch.bool)], 1)
    with torch.no_grad():
        a, _ = policy.response_logprobs(full_ids, full_mask, P, temperature=0.7)
        b, _ = hp.response_logprobs(full_ids, full_mask, P, temperature=0.7)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_greedy_generation_matches_across_engines(policy, tmp_path):
    hp = load_policy(export_hf(policy, tmp_path / "hf"))
    prompts = [policy.tokenizer.encode(t) for t in ["12+34=", "5+6=", "99+1=", "1+2="]]
    params = SamplingParams(max_new_tokens=6, greedy=True)
    ours = TinyEngine(policy).sample(prompts, params)
    theirs = HFEngine(hp).sample(prompts, params)
    assert [g.response_ids for g in theirs] == [g.response_ids for g in ours]
    for g, h in zip(ours, theirs):
        torch.testing.assert_close(torch.tensor(h.logprobs), torch.tensor(g.logprobs), atol=1e-4, rtol=1e-4)


def test_export_rejects_non_tiny_policy(policy, tmp_path):
    hp = load_policy(export_hf(policy, tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="tiny"):
        export_hf(hp, tmp_path / "again")


def prompt_completion_batch(tok, prompts, completions):
    """Prompts left-padded and completions right-padded, then concatenated: the batch TRL's GRPOTrainer scores."""
    p_ids, p_mask = left_padded(tok, prompts)
    enc = [tok.encode(c) + [tok.eos_id] for c in completions]
    T = max(map(len, enc))
    c_ids = torch.full((len(enc), T), tok.pad_id, dtype=torch.long)
    c_mask = torch.zeros((len(enc), T), dtype=torch.bool)
    for i, e in enumerate(enc):
        c_ids[i, : len(e)] = torch.tensor(e)
        c_mask[i, : len(e)] = True
    return torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1), p_ids.shape[1], c_mask


def hf_response_logprobs(hf, ids, mask, P, temperature):
    """Completion log-probs from a forward given only input_ids and attention_mask (no position_ids)."""
    logits = hf(input_ids=ids, attention_mask=mask.long()).logits[:, P - 1 : -1].float() / temperature  # (B, T, V)
    return torch.log_softmax(logits, -1).gather(-1, ids[:, P:, None]).squeeze(-1)  # (B, T)


def test_positions_from_mask_matches_policy_on_left_padded_batch(policy):
    """Without position_ids a GPT-2 numbers pads as positions, so shorter prompts are scored shifted;
    ``positions_from_mask`` gives our Policy's log-probs on every real completion token."""
    ids, mask, P, c_mask = prompt_completion_batch(
        policy.tokenizer, ["12+34=", "7+5=", "98+76=", "\n a"], ["46", "12", "174", "x"])
    hf = to_gpt2(policy)
    with torch.no_grad():
        ours, _ = policy.response_logprobs(ids, mask, P, temperature=0.7)
        shifted = hf_response_logprobs(hf, ids, mask, P, 0.7)
        assert positions_from_mask(positions_from_mask(hf)) is hf  # in place, and twice is once
        fixed = hf_response_logprobs(hf, ids, mask, P, 0.7)
        with_ids = hf(input_ids=ids, attention_mask=mask.long(),
                      position_ids=torch.zeros_like(ids)).logits  # explicit position_ids still win
        plain = to_gpt2(policy)(input_ids=ids, attention_mask=mask.long(), position_ids=torch.zeros_like(ids)).logits
    padded = ~mask[:, :P].all(1)  # rows whose prompt was padded
    assert padded.sum() == 2
    assert (shifted - ours)[padded][c_mask[padded]].abs().max() > 1e-2  # the bug: shifted positions
    torch.testing.assert_close(shifted[~padded][c_mask[~padded]], ours[~padded][c_mask[~padded]],
                               atol=1e-5, rtol=1e-5)  # an unpadded row is unaffected
    torch.testing.assert_close(fixed[c_mask], ours[c_mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_ids, plain)


def test_positions_from_mask_keeps_greedy_generation(policy, tmp_path):
    """generate passes position_ids itself (and uses the KV cache): the patch changes nothing there."""
    hp = load_policy(export_hf(policy, tmp_path / "hf"))
    prompts = [policy.tokenizer.encode(t) for t in ["12+34=", "5+6=", "99+1=", "1+2="]]
    params = SamplingParams(max_new_tokens=6, greedy=True)
    before = HFEngine(hp).sample(prompts, params)
    positions_from_mask(hp.model)
    after = HFEngine(hp).sample(prompts, params)
    assert [g.response_ids for g in after] == [g.response_ids for g in before]
    copied = copy.deepcopy(hp.model)  # the engines' weight copy: the patch must run the copy's weights
    assert copied.transformer.forward.__self__ is copied.transformer
    ids = torch.tensor([[policy.tokenizer.pad_id] * 2 + prompts[1]])
    out = hp.model.generate(input_ids=ids, attention_mask=(ids != policy.tokenizer.pad_id).long(),
                            max_new_tokens=4, do_sample=False, pad_token_id=policy.tokenizer.pad_id)
    k = min(4, len(before[1].response_ids))  # left-padded generate: same greedy tokens as unpadded
    assert out[0, ids.shape[1]: ids.shape[1] + k].tolist() == before[1].response_ids[:k]
