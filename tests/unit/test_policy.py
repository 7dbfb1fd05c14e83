"""The character tokenizer, the tiny GPT (KV cache, left padding) and Policy (log-probs, save/load, errors)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from offpolicy.experience import Experience, collate
from offpolicy.policy.model import CheckpointError, build_tiny, load_policy
from offpolicy.policy.tiny import KVCache, TinyConfig
from offpolicy.policy.tokenizer import SPECIALS, CharTokenizer


# ---- tokenizer ---------------------------------------------------------------------------------
def test_char_tokenizer_round_trip_keeps_spaces_and_newlines():
    tok = CharTokenizer()
    text = "12 + 345 =\n 357 ~!"
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert min(ids) >= len(SPECIALS)
    assert tok.decode(ids) == text
    assert tok.vocab_size == len(SPECIALS) + 96  # printable ASCII and newline


def test_decode_stops_at_eos_and_skips_other_specials():
    tok = CharTokenizer()
    ids = [tok.bos_id] + tok.encode("7 8") + [tok.pad_id, tok.unk_id] + tok.encode("9") + [tok.eos_id] + tok.encode("x")
    assert tok.decode(ids) == "7 89"


def test_unknown_characters_map_to_unk_or_raise_when_strict():
    tok = CharTokenizer()
    assert tok.encode("aé") == [tok.encode("a")[0], tok.unk_id]
    with pytest.raises(ValueError, match="é"):
        tok.encode("aé", strict=True)


def test_tokenizer_rejects_duplicate_characters():
    with pytest.raises(ValueError, match="unique"):
        CharTokenizer("aab")


def test_tokenizer_save_load(tmp_path):
    tok = CharTokenizer("0123456789+= \n")
    tok.save(tmp_path)
    back = CharTokenizer.load(tmp_path)
    assert back.chars == tok.chars and back.vocab_size == tok.vocab_size
    assert back.encode("1 + 2 =\n") == tok.encode("1 + 2 =\n")


def test_tokenizer_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        CharTokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"type": "bpe"}))
    with pytest.raises(ValueError, match="not an offpolicy character tokenizer"):
        CharTokenizer.load(tmp_path)


# ---- tiny GPT ----------------------------------------------------------------------------------
def test_tiny_config_checks_head_divisibility():
    with pytest.raises(ValueError, match="divisible"):
        TinyConfig(d_model=30, n_heads=4)


def test_build_tiny_is_seeded_and_leaves_the_global_rng_alone():
    cfg = dict(d_model=32, n_layers=1, n_heads=2, max_len=16)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_tiny(TinyConfig(**cfg), seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    b = build_tiny(TinyConfig(**cfg), seed=1)
    c = build_tiny(TinyConfig(**cfg), seed=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    assert a.model.cfg.vocab_size == a.tokenizer.vocab_size


def test_kv_cache_decoding_equals_one_full_forward(tiny_policy):
    model = tiny_policy.model.eval()
    ids = torch.randint(4, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)  # (B, L, V)
        cache = KVCache(model.cfg, 2, 9, torch.float32, "cpu")
        steps = [model(ids[:, :5], cache=cache)]
        for t in range(5, 9):
            steps.append(model(ids[:, t : t + 1], attention_mask=torch.ones(2, t + 1, dtype=torch.bool), cache=cache))
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_unpadded_forward_needs_no_mask_with_or_without_a_cache(tiny_policy):
    """attention_mask=None means "no padding": the same logits as an all-true mask, in one pass or cached steps."""
    model = tiny_policy.model.eval()
    ids = torch.randint(4, 50, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        masked = model(ids, attention_mask=torch.ones_like(ids, dtype=torch.bool))
        assert torch.allclose(model(ids), masked, atol=1e-5)
        cache = KVCache(model.cfg, 3, 10, torch.float32, "cpu")
        steps = [model(ids[:, :4], cache=cache)]  # causal prefill
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(4, 7)]  # one token: no mask at all
        steps.append(model(ids[:, 7:], cache=cache))  # several tokens after a filled cache: bottom-right causal
    assert cache.len == 10
    assert torch.allclose(torch.cat(steps, dim=1), masked, atol=1e-5)


def test_unpadded_cache_past_max_len_is_an_error(tiny_policy):
    model = tiny_policy.model.eval()
    max_len = model.cfg.max_len
    cache = KVCache(model.cfg, 1, max_len + 1, torch.float32, "cpu")
    with torch.no_grad():
        model(torch.zeros(1, max_len, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="max_len"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_left_padding_does_not_change_the_logits(tiny_policy):
    ids = torch.tensor([[10, 11, 12, 13]])
    padded = torch.tensor([[0, 0, 0, 10, 11, 12, 13]])
    attn = torch.tensor([[False, False, False, True, True, True, True]])
    with torch.no_grad():
        alone = tiny_policy.logits(ids, torch.ones_like(ids, dtype=torch.bool))
        batched = tiny_policy.logits(padded, attn)
    assert torch.isfinite(batched).all()  # padded queries attend to themselves: no NaN rows
    assert torch.allclose(batched[:, 3:], alone, atol=1e-5)


def test_sequences_longer_than_max_len_are_an_error(tiny_policy):
    with pytest.raises(ValueError, match="max_len"):
        tiny_policy.model(torch.zeros(1, tiny_policy.model.cfg.max_len + 1, dtype=torch.long))


# ---- Policy ------------------------------------------------------------------------------------
def _batch(policy):
    tok = policy.tokenizer
    exps = [Experience(tok.encode("12+3="), tok.encode("15") + [tok.eos_id]),
            Experience(tok.encode("7+1="), tok.encode("8"))]
    return collate(exps, tok.pad_id)


def test_response_logprobs_equal_a_naive_per_token_computation(tiny_policy):
    b = _batch(tiny_policy)
    with torch.no_grad():
        logp, ent = tiny_policy.response_logprobs(b.input_ids, b.attention_mask, b.prompt_len, temperature=0.7,
                                                  with_entropy=True)
    assert logp.shape == ent.shape == b.mask.shape
    tok = tiny_policy.tokenizer
    for i, (prompt, response) in enumerate([("12+3=", "15"), ("7+1=", "8")]):
        seq = tok.encode(prompt) + tok.encode(response) + ([tok.eos_id] if i == 0 else [])
        n_resp = len(seq) - len(tok.encode(prompt))
        with torch.no_grad():
            logits = tiny_policy.model(torch.tensor([seq]))[0] / 0.7  # (L, V), unpadded
        lp = F.log_softmax(logits, -1)
        for t in range(n_resp):
            pos = len(seq) - n_resp + t
            assert logp[i, t].item() == pytest.approx(lp[pos - 1, seq[pos]].item(), abs=1e-5)
            assert ent[i, t].item() == pytest.approx(-(lp[pos - 1].exp() * lp[pos - 1]).sum().item(), abs=1e-4)


def test_response_logprobs_carry_gradients(tiny_policy):
    b = _batch(tiny_policy)
    logp, ent = tiny_policy.response_logprobs(b.input_ids, b.attention_mask, b.prompt_len)
    assert ent is None
    (logp * b.mask).sum().backward()
    assert all(p.grad is not None for p in tiny_policy.parameters())


def test_copy_is_frozen_and_independent(tiny_policy):
    ref = tiny_policy.copy()
    assert not any(p.requires_grad for p in ref.parameters())
    with torch.no_grad():
        next(tiny_policy.parameters()).add_(1.0)
    assert not torch.equal(next(ref.parameters()), next(tiny_policy.parameters()))


def test_save_load_round_trip(tiny_policy, tmp_path):
    tiny_policy.save(tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}
    back = load_policy(tmp_path / "ckpt")
    assert back.kind == "tiny" and back.model.cfg == tiny_policy.model.cfg
    sd, sd2 = tiny_policy.model.state_dict(), back.model.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    b = _batch(tiny_policy)
    with torch.no_grad():
        a = tiny_policy.response_logprobs(b.input_ids, b.attention_mask, b.prompt_len)[0]
        c = back.response_logprobs(b.input_ids, b.attention_mask, b.prompt_len)[0]
    assert torch.equal(a, c)


def test_load_policy_of_a_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_policy(tmp_path / "nope")


def test_load_policy_of_a_folder_without_config(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_policy(tmp_path)


def test_load_policy_of_a_file(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="folder, not a file"):
        load_policy(tmp_path / "weights.bin")


def test_load_policy_of_weights_with_another_width_names_what_does_not_fit(tiny_policy, tmp_path):
    tiny_policy.save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "d_model": 64}))
    with pytest.raises(CheckpointError, match="does not fit") as err:
        load_policy(tmp_path)
    msg = str(err.value)
    assert "model.safetensors" in msg and "shape mismatch" in msg
    # names a parameter and both shapes, e.g. "blocks.0.ln1.weight: checkpoint (32,) vs model (64,)"
    assert re.search(r"[\w.]+: checkpoint \([\d, ]*32[\d, ]*\) vs model \([\d, ]*64[\d, ]*\)", msg), msg


def test_load_policy_of_weights_with_another_depth_lists_missing_keys(tiny_policy, tmp_path):
    tiny_policy.save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "n_layers": 3}))
    with pytest.raises(CheckpointError, match=r"missing \['blocks\.2\."):
        load_policy(tmp_path)


@pytest.mark.parametrize("edit,match", [
    (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "offpolicy-tiny", "width": 3})), "width"),
    (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    (lambda d: CharTokenizer("abc").save(d), "tokenizer has 7 tokens"),
])
def test_load_policy_of_broken_checkpoints(tiny_policy, tmp_path, edit, match):
    tiny_policy.save(tmp_path)
    edit(tmp_path)
    with pytest.raises(CheckpointError, match=match):
        load_policy(tmp_path)
