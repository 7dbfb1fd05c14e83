"""Export the built-in tiny GPT and its character tokenizer as a Hugging Face model folder.

``export_hf(policy_or_checkpoint_dir, out_dir)`` writes a ``GPT2LMHeadModel`` and a
``PreTrainedTokenizerFast`` with ``save_pretrained``, so any ``transformers``-based tool (TRL's
``GRPOTrainer``, ``from_pretrained``, offpolicy's own ``load_policy``) can load the tiny model
from a local folder, no network needed. Needs the ``hf`` extra.

The two architectures are the same network: pre-LayerNorm blocks (eps 1e-5), learned absolute
positions, fused q/k/v projection with bias, attention scaled by ``1/sqrt(d_head)``, an MLP
``Linear → GELU (exact, erf) → Linear`` of width ``4·d_model``, a final LayerNorm and an output
layer tied to the token embedding. GPT-2 stores its projections as ``Conv1D`` (weight
``(in, out)``), the transpose of ``nn.Linear``'s ``(out, in)``. Dropout is 0 everywhere, as in
the tiny model, so a trainer that calls ``model.train()`` samples and scores the same network.

The tokenizer is a ``WordLevel`` model over our exact vocabulary and ids (``<pad>=0 <bos>=1
<eos>=2 <unk>=3``, then one token per character), a pre-tokenizer that isolates every character
(spaces and newlines included) and a ``Fuse`` decoder, so ``decode(encode(s)) == s``. Like
:class:`~offpolicy.policy.tokenizer.CharTokenizer`, it adds no BOS/EOS when encoding. Load it
back with ``PreTrainedTokenizerFast.from_pretrained`` (``offpolicy.policy.model.load_policy``
does): ``AutoTokenizer`` picks a class from ``config.json`` for some model types and can rebuild
the pipeline.

Position ids: a GPT-2 called without ``position_ids`` numbers positions from the first column,
pads included. Our engines and :meth:`Policy.logits` always pass ``position_ids`` (cumulative
attention mask − 1), and so does ``transformers``' ``generate``; a caller that left-pads prompts of
different lengths and calls the model's forward without them (TRL's ``GRPOTrainer`` scoring its
completions, ``_get_per_token_logps_and_entropies``) scores every shorter prompt at shifted
positions. :func:`positions_from_mask` makes such a forward number positions from the attention
mask instead.
"""

from __future__ import annotations

import types
from pathlib import Path

import torch

from offpolicy.policy.model import CheckpointError, Policy, load_policy
from offpolicy.policy.tokenizer import SPECIALS, CharTokenizer


def export_hf(policy_or_checkpoint_dir: Policy | str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir`` (config.json, model.safetensors, tokenizer files) loadable by ``from_pretrained``.

    ``policy_or_checkpoint_dir`` is a tiny :class:`Policy` or a tiny checkpoint folder. Returns ``out_dir``.
    """
    policy = _as_tiny_policy(policy_or_checkpoint_dir)
    model = to_gpt2(policy)
    tokenizer = to_hf_tokenizer(policy.tokenizer, model_max_length=policy.model.cfg.max_len)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _as_tiny_policy(src: Policy | str | Path) -> Policy:
    policy = src if isinstance(src, Policy) else load_policy(src)
    if policy.kind != "tiny":
        raise CheckpointError(f"export_hf converts the built-in tiny model; got a {policy.kind!r} policy")
    if not isinstance(policy.tokenizer, CharTokenizer):
        raise CheckpointError("export_hf needs the tiny model's CharTokenizer")
    return policy


def gpt2_config(policy: Policy):
    """The ``GPT2Config`` describing the tiny model's architecture."""
    from transformers import GPT2Config

    cfg, tok = policy.model.cfg, policy.tokenizer
    return GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=cfg.d_model, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, n_inner=4 * cfg.d_model, activation_function="gelu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
        tie_word_embeddings=True, use_cache=True,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
    )


def gpt2_state_dict(policy: Policy) -> dict[str, torch.Tensor]:
    """The tiny model's weights under GPT-2's names (Conv1D weights transposed)."""
    model = policy.model
    t = lambda w: w.detach().T.contiguous()  # noqa: E731  nn.Linear (out, in) -> Conv1D (in, out)
    sd: dict[str, torch.Tensor] = {
        "transformer.wte.weight": model.tok.weight.detach().clone(),
        "transformer.wpe.weight": model.pos.weight.detach().clone(),
        "transformer.ln_f.weight": model.ln_f.weight.detach().clone(),
        "transformer.ln_f.bias": model.ln_f.bias.detach().clone(),
    }
    for i, b in enumerate(model.blocks):
        h = f"transformer.h.{i}."
        sd.update({
            h + "ln_1.weight": b.ln1.weight.detach().clone(), h + "ln_1.bias": b.ln1.bias.detach().clone(),
            h + "attn.c_attn.weight": t(b.qkv.weight), h + "attn.c_attn.bias": b.qkv.bias.detach().clone(),
            h + "attn.c_proj.weight": t(b.proj.weight), h + "attn.c_proj.bias": b.proj.bias.detach().clone(),
            h + "ln_2.weight": b.ln2.weight.detach().clone(), h + "ln_2.bias": b.ln2.bias.detach().clone(),
            h + "mlp.c_fc.weight": t(b.mlp[0].weight), h + "mlp.c_fc.bias": b.mlp[0].bias.detach().clone(),
            h + "mlp.c_proj.weight": t(b.mlp[2].weight), h + "mlp.c_proj.bias": b.mlp[2].bias.detach().clone(),
        })
    return sd


def to_gpt2(policy: Policy):
    """An in-memory ``GPT2LMHeadModel`` computing the same logits as the tiny ``policy``."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise ImportError("exporting to Hugging Face needs the 'hf' extra: pip install 'offpolicy[hf]'") from None
    policy = _as_tiny_policy(policy)
    hf = GPT2LMHeadModel(gpt2_config(policy))
    sd = gpt2_state_dict(policy)
    params = dict(hf.named_parameters())  # the tied lm_head shares wte's parameter and is not listed twice
    missing = sorted(set(params) - set(sd))
    unexpected = sorted(set(sd) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"GPT-2 export does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != sd[name].shape:
                raise CheckpointError(f"GPT-2 export: {name} is {tuple(p.shape)}, tiny gives {tuple(sd[name].shape)}")
            p.copy_(sd[name])
    if hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr():
        raise CheckpointError("GPT-2 export: lm_head is not tied to the token embedding")
    return hf.eval()


def to_hf_tokenizer(tokenizer: CharTokenizer, model_max_length: int | None = None):
    """A ``PreTrainedTokenizerFast`` with the character tokenizer's exact ids, encode and decode."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(list(SPECIALS) + list(tokenizer.chars))}
    if len(vocab) != tokenizer.vocab_size:
        raise ValueError("character tokenizer vocabulary clashes with its special tokens")
    rust = RustTokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character, \n too
    rust.decoder = decoders.Fuse()  # concatenate, no spaces between tokens
    rust.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    hf = PreTrainedTokenizerFast(
        tokenizer_object=rust, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        clean_up_tokenization_spaces=False, padding_side="left", **kwargs,
    )
    ids = [hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.unk_token_id]
    if ids != [tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id]:
        raise ValueError(f"exported special-token ids {ids} differ from the character tokenizer's")
    return hf


def positions_from_mask(model):
    """Make a GPT-2 (``to_gpt2`` or ``from_pretrained`` of an exported folder) number positions from its mask.

    Patches ``model``'s backbone (``model.base_model``, the ``GPT2Model``; TRL's fused log-prob head
    calls it directly) in place: a forward given a 2-D ``attention_mask`` and no ``position_ids``
    uses ``position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)`` (last ``T`` columns for
    ``T`` new tokens), the numbering our engines use, so a left-padded row is scored at the
    positions it would have unpadded. Explicit ``position_ids`` (``generate``, our engines) and
    calls without a mask are unchanged. The patch is a method bound to the backbone, so
    ``copy.deepcopy`` (our engines' weight copies) binds it to the copy. Returns ``model``;
    applying it twice is a no-op.
    """
    backbone = model.base_model
    if "forward" not in vars(backbone):
        backbone.forward = types.MethodType(_forward_with_mask_positions, backbone)
    return model


def _forward_with_mask_positions(self, input_ids=None, *, attention_mask=None, position_ids=None, inputs_embeds=None,
                                 **kwargs):
    if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
        n_new = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -n_new:]  # (B, T)
    return type(self).forward(self, input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              inputs_embeds=inputs_embeds, **kwargs)
