"""Shared-prompt forward pass: a group's G responses share one prompt, so compute it once.

A GRPO batch holds G responses per prompt. The plain forward runs every row's prompt through the
model again; here each distinct prompt goes through once, its per-layer keys and values are
gathered for the rows that share it, and only the response tokens run per row. With prompt length
P, response length T and G responses per prompt, the token positions processed fall from
``G·(P+T)`` to ``P + G·T`` per group; gradients flow back through the gather (``index_select``
sums them over the rows of a group), so the result and its gradient equal the plain forward's.

This is the tiny GPT's path (``Policy.response_logprobs`` uses it when rows share prompts);
Hugging Face models keep the plain forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from offpolicy.policy.tiny import TinyGPT, _attention_mask


def unique_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of one row per distinct (left-padded) prompt, and each row's index into them: (U,), (B,)."""
    key = torch.cat([prompt_ids, prompt_mask.long()], dim=1)  # (B, 2P): ids and padding must both match
    _, inverse = torch.unique(key, dim=0, return_inverse=True)  # (B,) in 0..U-1
    first = torch.full((int(inverse.max()) + 1,), key.shape[0], dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(key.shape[0]), reduce="amin")  # (U,) a row of each
    return first, inverse


def shared_prompt_logits(model: TinyGPT, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         prompt_len: int, groups: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Logits (B, T, V) at positions ``P-1 .. P+T-2`` (the ones that predict the response tokens).

    ``input_ids`` (B, P+T): left-padded prompts then right-padded responses, ``attention_mask``
    (B, P+T) bool — the :class:`~offpolicy.experience.Batch` layout. Equal to
    ``model(input_ids, attention_mask, position_ids)[:, P-1:-1]`` up to float rounding.
    ``groups``: ``unique_prompts`` of the batch, if the caller has it already.
    """
    P = prompt_len
    B, T = input_ids.shape[0], input_ids.shape[1] - P
    first, inverse = groups if groups is not None else unique_prompts(input_ids[:, :P], attention_mask[:, :P])
    p_ids, p_mask = input_ids[first, :P], attention_mask[first, :P]  # (U, P)
    p_pos = (p_mask.long().cumsum(-1) - 1).clamp(min=0)
    r_pos = p_mask.long().sum(-1, keepdim=True)[inverse] + torch.arange(T)  # (B, T): after each real prompt
    if int(r_pos.max()) >= model.cfg.max_len:
        raise ValueError(f"sequence longer than the model's max_len={model.cfg.max_len}")
    xp = model.tok(p_ids) + model.pos(p_pos)  # (U, P, D)
    xr = model.tok(input_ids[:, P:]) + model.pos(r_pos)  # (B, T, D)
    p_attn = _attention_mask(p_mask, 0, P)  # (U, 1, P, P)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    r_attn = torch.cat([p_mask[inverse][:, None, :].expand(B, T, P), causal.expand(B, T, T)], dim=-1)[:, None]
    for block in model.blocks:
        q, k, v = block.heads(xp)
        yp = F.scaled_dot_product_attention(q, k, v, attn_mask=p_attn)
        qr, kr, vr = block.heads(xr)
        keys = torch.cat([k.index_select(0, inverse), kr], dim=2)  # (B, H, P+T, Dh)
        values = torch.cat([v.index_select(0, inverse), vr], dim=2)
        yr = F.scaled_dot_product_attention(qr, keys, values, attn_mask=r_attn)
        xp, xr = block.residual(xp, yp), block.residual(xr, yr)
    h = torch.cat([xp[:, -1:].index_select(0, inverse), xr[:, :-1]], dim=1)  # (B, T, D)
    return model.ln_f(h) @ model.tok.weight.T
