"""Hugging Face causal LMs behind Policy: tiny models built in code, saved with save_pretrained, loaded back.

No downloads: the tokenizer is a character-level ``tokenizers`` pipeline built here, and every model has
2 layers of width 32.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from offpolicy.config import OptimConfig, RLConfig  # noqa: E402
from offpolicy.experience import Experience, collate  # noqa: E402
from offpolicy.policy.hf import HFTokenizer  # noqa: E402
from offpolicy.policy.model import CheckpointError, load_policy  # noqa: E402
from offpolicy.rollout.engines import HFEngine, SamplingParams, make_engine  # noqa: E402
from offpolicy.train.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from offpolicy.train.learner import Learner  # noqa: E402

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
TEXT = "12 + 345 =\n 357"


def char_tokenizer():
    """A character-level fast tokenizer: every character is one token, spaces and newlines included."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>",
                                                eos_token="<eos>", unk_token="<unk>")


def model_config(kind: str):
    common = dict(vocab_size=len(SPECIALS) + len(CHARS), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **common)
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, **common)
    if kind == "llama":
        return transformers.LlamaConfig(**llama_like)
    return transformers.Qwen2Config(**llama_like)


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen2"])
def hf_dir(request, tmp_path_factory):
    """A folder written by ``save_pretrained``: a freshly initialised 2-layer model and the character tokenizer."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(model_config(request.param))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def test_load_policy_reads_a_save_pretrained_folder(hf_dir):
    policy = load_policy(hf_dir)
    assert policy.kind == "hf"
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] in ("gpt2", "llama", "qwen2")
    tok = policy.tokenizer
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, len(SPECIALS) + len(CHARS))


def test_tokenizer_round_trip_keeps_spaces_and_newlines(hf_dir):
    # transformers 5's AutoTokenizer turns this folder into a Qwen2Tokenizer for a Qwen2 config, which drops
    # the spaces and newlines of a custom tokenizer (NOTES.md); load_policy must load it as saved
    tok = load_policy(hf_dir).tokenizer
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids + [tok.eos_id] + tok.encode("junk")) == TEXT  # decoding stops at EOS


def _behaviour_vs_learner(policy, gens, prompts, temperature):
    exps = [Experience(p, g.response_ids, behavior_logprobs=g.logprobs) for p, g in zip(prompts, gens)]
    b = collate(exps, policy.tokenizer.pad_id)
    with torch.no_grad():
        logp, _ = policy.response_logprobs(b.input_ids, b.attention_mask, b.prompt_len, temperature)
    return logp * b.mask, b.behavior_logp * b.mask


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=6), SamplingParams(max_new_tokens=6, greedy=True),
                                    SamplingParams(max_new_tokens=6, temperature=0.7)], ids=["t1", "greedy", "t0.7"])
def test_hf_engine_logprobs_match_the_policy(hf_dir, params):
    policy = load_policy(hf_dir)
    engine = make_engine(policy)
    assert isinstance(engine, HFEngine)
    prompts = [policy.tokenizer.encode(t) for t in ("12+345=", "7+8=", "1 + 1 =")]  # left padding of 3 lengths
    gens = engine.sample(prompts, params, seed=0)
    assert len(gens) == 3 and all(1 <= len(g.response_ids) == len(g.logprobs) <= 6 for g in gens)
    learner, behaviour = _behaviour_vs_learner(policy, gens, prompts, 1.0 if params.greedy else params.temperature)
    assert torch.allclose(learner, behaviour, atol=1e-4)
    assert engine.tokens_generated == sum(len(g.response_ids) for g in gens)


def test_hf_engine_seeds_reproduce(hf_dir):
    policy = load_policy(hf_dir)
    engine = HFEngine(policy, max_batch=2)
    prompts = [policy.tokenizer.encode(t) for t in ("1+2=", "30+4=", "5+6=")]
    a = engine.sample(prompts, SamplingParams(max_new_tokens=5), seed=3)
    b = engine.sample(prompts, SamplingParams(max_new_tokens=5), seed=3)
    assert [g.response_ids for g in a] == [g.response_ids for g in b]


def test_policy_save_and_checkpoint_round_trip(hf_dir, tmp_path):
    policy = load_policy(hf_dir)
    path = save_checkpoint(tmp_path / "checkpoints", "final", policy, {"step": 7})
    back, state = load_checkpoint(path)
    assert state["step"] == 7 and back.kind == "hf"
    assert back.tokenizer.decode(back.tokenizer.encode(TEXT)) == TEXT
    sd, sd2 = policy.model.state_dict(), back.model.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    # the checkpoint is a plain Hugging Face folder too
    assert isinstance(transformers.AutoModelForCausalLM.from_pretrained(path), torch.nn.Module)


def test_learner_updates_an_hf_policy(hf_dir):
    policy = load_policy(hf_dir)
    tok = policy.tokenizer
    prompts = [tok.encode("1+2=")] * 4 + [tok.encode("30+4=")] * 4
    gens = HFEngine(policy).sample(prompts, SamplingParams(max_new_tokens=4), seed=0)
    exps = [Experience(p, g.response_ids, reward=float(i % 2), behavior_logprobs=g.logprobs, group_id=str(i // 4))
            for i, (p, g) in enumerate(zip(prompts, gens))]
    before = [p.detach().clone() for p in policy.parameters()]
    learner = Learner(policy, RLConfig(optim=OptimConfig(lr=1e-2)), total_updates=1)
    metrics = learner.update(collate(exps, tok.pad_id))
    assert all(torch.isfinite(v) for v in metrics.values())
    assert metrics["loss/ratio_mean"].item() == pytest.approx(1.0, abs=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_zero_loss_rows_are_skipped_on_an_hf_policy_with_the_same_gradient(hf_dir):
    """PSR (TOPR, negative weight 0) on an HF model: the negatives are not forwarded, the gradient is unchanged."""
    tok = load_policy(hf_dir).tokenizer
    prompts = [tok.encode("1+2=")] * 4 + [tok.encode("30+4=")] * 4
    gens = HFEngine(load_policy(hf_dir)).sample(prompts, SamplingParams(max_new_tokens=4), seed=0)
    exps = [Experience(p, g.response_ids, reward=float(i % 2), behavior_logprobs=g.logprobs, group_id=str(i // 4))
            for i, (p, g) in enumerate(zip(prompts, gens))]
    batch = collate(exps, tok.pad_id)
    grads, metrics = {}, {}
    for skip in (True, False):
        cfg = RLConfig(loss="topr", loss_params={"neg_low": 0.0, "neg_high": 0.0}, skip_zero_rows=skip,
                       optim=OptimConfig(lr=1e-2))
        learner = Learner(load_policy(hf_dir), cfg, total_updates=1)
        learner.opt.register_step_pre_hook(lambda opt, args, kwargs, _s=skip: grads.__setitem__(
            _s, [q.grad.clone() for g in opt.param_groups for q in g["params"] if q.grad is not None]))
        metrics[skip] = learner.update(batch)
    assert metrics[True]["train/active_row_frac"].item() == 0.5 and metrics[False]["train/active_row_frac"].item() == 1
    assert metrics[True]["loss/policy"].item() == pytest.approx(metrics[False]["loss/policy"].item(), rel=1e-5)
    assert len(grads[True]) == len(grads[False])
    for a, b in zip(grads[True], grads[False]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_unknown_dtype_is_rejected(hf_dir):
    with pytest.raises(ValueError, match="policy.dtype"):
        load_policy(hf_dir, dtype="int4")


def test_tokenizer_adapter_needs_eos_and_falls_back_to_eos_padding():
    hf = char_tokenizer()
    hf.pad_token = None
    assert HFTokenizer(hf).pad_id == HFTokenizer(hf).eos_id == 2
    hf.eos_token = None
    with pytest.raises(CheckpointError, match="no eos token"):
        HFTokenizer(hf)
