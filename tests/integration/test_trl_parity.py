"""TRL's GRPOTrainer scores completions on the exported tiny GPT with our Policy's log-probs.

The code path is TRL's own: ``GRPOTrainer._get_per_token_logps_and_entropies`` (what it calls for the
old, reference and current log-probs) on ``trainer.model`` after the trainer patched it with its fused
log-prob head (``add_fused_lm_head``), fed a batch built the way ``_generate_and_score_completions``
builds it: prompts left-padded and completions right-padded with ``trl.trainer.utils.pad``,
``attention_mask = cat(prompt_mask, completion_mask)``, ``logits_to_keep = completion_ids.size(1)``.
TRL passes no ``position_ids``; ``positions_from_mask`` makes the exported GPT-2 number positions from
the mask. ``bench_trl.py`` relies on this. Needs trl (the ``bench`` extra, not ``dev``): skipped without it.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
trl = pytest.importorskip("trl", reason="TRL parity needs trl (pip install 'offpolicy[bench]')")
pytest.importorskip("datasets", reason="GRPOTrainer needs datasets (pip install 'offpolicy[bench]')")

from offpolicy.policy.export import export_hf, positions_from_mask  # noqa: E402
from offpolicy.policy.model import build_tiny  # noqa: E402
from offpolicy.policy.tiny import TinyConfig  # noqa: E402

pytestmark = pytest.mark.slow  # ~9 s: imports trl and builds a GRPOTrainer

TEMPERATURE = 0.7  # TRL's fused head divides the logits by the trainer's temperature; ours by the same


def test_trl_per_token_logps_equal_ours_on_left_padded_batch(tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import pad

    policy = build_tiny(TinyConfig(d_model=32, n_layers=2, n_heads=2, max_len=24), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # weights away from their init, so positions change the numbers
        for q in policy.model.parameters():
            q.add_(0.2 * torch.randn(q.shape, generator=g))
    hf_dir = export_hf(policy, tmp_path / "hf")
    tok = PreTrainedTokenizerFast.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)  # unpatched first
    args = GRPOConfig(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=4, temperature=TEMPERATURE, beta=0.0, max_steps=1, report_to="none",
                      use_cpu=True, bf16=False, fp16=False, save_strategy="no", disable_tqdm=True,
                      use_vllm=False)  # bf16 autocast would change the numbers
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["1+2="] * 4}), processing_class=tok)

    prompts, completions = ["12+34=", "7+5=", "98+76=", "\n a"], ["46", "12", "174", "x"]
    p_ids = [torch.tensor(tok.encode(p, add_special_tokens=False)) for p in prompts]
    c_ids = [torch.tensor(tok.encode(c, add_special_tokens=False) + [tok.eos_token_id]) for c in completions]
    prompt_ids = pad(p_ids, padding_value=tok.pad_token_id, padding_side="left")  # (B, P)
    prompt_mask = pad([torch.ones_like(x) for x in p_ids], padding_value=0, padding_side="left")
    completion_ids = pad(c_ids, padding_value=tok.pad_token_id, padding_side="right")  # (B, T)
    completion_mask = pad([torch.ones_like(x) for x in c_ids], padding_value=0, padding_side="right")
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)
    P, T = prompt_ids.shape[1], completion_ids.shape[1]
    real = completion_mask.bool()

    def trl_logps():
        with torch.no_grad():
            logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, T)
        return logps  # (B, T)

    with torch.no_grad():
        ours, _ = policy.response_logprobs(input_ids, attention_mask.bool(), P, temperature=TEMPERATURE)  # (B, T)
    padded = ~prompt_mask.bool().all(1)
    assert padded.sum() == 2 and trainer.temperature == TEMPERATURE

    before = trl_logps()  # the bug this guards against: shorter prompts scored at shifted positions
    assert (before - ours)[padded][real[padded]].abs().max() > 1e-2
    torch.testing.assert_close(before[~padded][real[~padded]], ours[~padded][real[~padded]], atol=1e-5, rtol=1e-5)

    positions_from_mask(trainer.model)  # after TRL's own patch: its fused head calls the patched backbone
    torch.testing.assert_close(trl_logps()[real], ours[real], atol=1e-5, rtol=1e-5)
