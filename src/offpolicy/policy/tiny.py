"""The built-in tiny GPT: a small pre-LayerNorm decoder in plain PyTorch, sized for CPU.

It supports left-padded batches (an attention mask plus position ids) and an
explicit KV cache, so the rollout engine can sample a whole batch with one
forward pass per generated token. Without an attention mask it takes the batch
as unpadded and skips masks altogether (SDPA's own causal kernel while filling,
no mask when decoding one token), which is the rollout engine's fast path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TinyConfig:
    """Shape of the tiny GPT (defaults: ~0.9M parameters with a 99-token vocabulary)."""

    vocab_size: int = 99
    d_model: int = 160  # width
    n_layers: int = 3  # transformer blocks
    n_heads: int = 4  # attention heads (d_model must divide evenly)
    max_len: int = 128  # longest prompt + response in tokens
    model_type: str = "offpolicy-tiny"

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"TinyConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """Preallocated keys/values for every layer: (B, H, L_max, Dh) each, filled left to right."""

    def __init__(self, cfg: TinyConfig, batch: int, length: int, dtype: torch.dtype, device) -> None:
        dh = cfg.d_model // cfg.n_heads
        shape = (cfg.n_layers, batch, cfg.n_heads, length, dh)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.len = 0


class Block(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model, cfg.d_model))

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys, values of ``x`` (B, L, D): 3 × (B, H, L, Dh)."""
        B, L, D = x.shape
        qkv = self.qkv(self.ln1(x)).view(B, L, 3, self.n_heads, D // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # the same views as split + transpose, fewer ops
        return q, k, v

    def residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The block's output from its input ``x`` (B, L, D) and the attention output ``y`` (B, H, L, Dh)."""
        B, L, D = x.shape
        x = x + self.proj(y.transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.ln2(x))

    def forward(self, x, attn_mask: torch.Tensor | None, cache: KVCache | None = None, layer: int = 0):
        """``attn_mask`` (B or 1, 1, L, L_k) bool, or None for unpadded rows: causal when L > 1, else full."""
        L = x.shape[1]
        q, k, v = self.heads(x)
        if cache is not None:
            start = cache.len
            cache.k[layer, :, :, start : start + L] = k
            cache.v[layer, :, :, start : start + L] = v
            k = cache.k[layer, :, :, : start + L]
            v = cache.v[layer, :, :, : start + L]
        is_causal = attn_mask is None and L > 1  # only ever with an empty cache (see _unpadded_mask)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)  # (B,H,L,Dh)
        return self.residual(x, y)


class TinyGPT(nn.Module):
    """Decoder-only transformer with learned positions and tied input/output embeddings."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, L)
        attention_mask: torch.Tensor | None = None,  # (B, L_total) bool over cache + new tokens; None: no padding
        position_ids: torch.Tensor | None = None,  # (B, L)
        cache: KVCache | None = None,
    ) -> torch.Tensor:  # logits (B, L, V)
        """Logits of ``input_ids`` after what ``cache`` holds.

        With neither ``attention_mask`` nor ``position_ids`` every row is taken as unpadded: the
        positions are ``past .. past+L-1`` for all rows, the length check is one integer comparison
        and no mask tensor is built. Otherwise the mask and positions handle left padding.
        """
        B, L = input_ids.shape
        past = cache.len if cache is not None else 0
        if attention_mask is None and position_ids is None:
            if past + L > self.cfg.max_len:
                raise ValueError(f"sequence longer than the model's max_len={self.cfg.max_len}")
            pos = self.pos.weight[past : past + L]  # (L, D)
            mask = _unpadded_mask(past, L, input_ids.device)
        else:
            if attention_mask is None:
                attention_mask = torch.ones(B, past + L, dtype=torch.bool, device=input_ids.device)
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            if int(position_ids.max()) >= self.cfg.max_len:
                raise ValueError(f"sequence longer than the model's max_len={self.cfg.max_len}")
            pos = self.pos(position_ids)  # (B, L, D)
            mask = _attention_mask(attention_mask, past, L)
        x = self.tok(input_ids) + pos
        for i, block in enumerate(self.blocks):
            x = block(x, mask, cache, i)
        if cache is not None:
            cache.len += L
        return self.ln_f(x) @ self.tok.weight.T

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _unpadded_mask(past: int, L: int, device) -> torch.Tensor | None:
    """Mask for unpadded rows: None when SDPA needs none, else (1, 1, L, past+L) bool causal.

    None covers an empty cache (``is_causal`` is exact: queries and keys start together) and a
    single new token (it sees the whole cache). Several new tokens after a filled cache need the
    explicit mask, because SDPA's ``is_causal`` aligns the triangle to the top left.
    """
    if past == 0 or L == 1:
        return None
    q_pos = torch.arange(past, past + L, device=device)[:, None]
    return (torch.arange(past + L, device=device)[None, :] <= q_pos)[None, None]


def _attention_mask(key_valid: torch.Tensor, past: int, L: int) -> torch.Tensor:
    """(B, 1, L, past+L) bool: causal, keys must be real tokens, and every query sees itself.

    Letting a padded query attend to itself keeps its softmax row non-empty (no NaN);
    padded positions never feed real ones because real queries cannot see pad keys.
    """
    Lk = past + L
    q_pos = torch.arange(past, Lk, device=key_valid.device)[:, None]
    k_pos = torch.arange(Lk, device=key_valid.device)[None, :]
    causal = k_pos <= q_pos  # (L, Lk)
    mask = causal[None] & key_valid[:, None, :Lk]
    mask |= k_pos == q_pos
    return mask[:, None]
