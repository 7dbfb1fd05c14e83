"""One interface over the built-in tiny GPT and Hugging Face causal LMs.

A :class:`Policy` bundles a model and its tokenizer, computes per-token
log-probabilities of responses (the learner's and the evaluator's only need),
and saves/loads itself. Tiny checkpoints are a folder with ``config.json``
(``model_type: offpolicy-tiny``), ``model.safetensors`` and ``tokenizer.json``;
any other folder or hub id is handed to ``transformers``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from offpolicy.policy.tiny import TinyConfig, TinyGPT
from offpolicy.policy.tokenizer import CharTokenizer, Tokenizer


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not fit the model it is loaded into."""


class Policy:
    """A causal LM plus tokenizer; ``kind`` is ``"tiny"`` or ``"hf"``."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, kind: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.kind = kind

    # ---- forward -------------------------------------------------------------------------
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, V) for left-padded ``input_ids`` (B, L) with a bool ``attention_mask``."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if self.kind == "tiny":
            return self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=position_ids)
        return out.logits

    def response_logprobs(
        self,
        input_ids: torch.Tensor,  # (B, P+T)
        attention_mask: torch.Tensor,  # (B, P+T) bool
        prompt_len: int,  # P
        temperature: float = 1.0,
        with_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (B, T) of the response tokens under ``softmax(logits / temperature)`` (and, with
        ``with_entropy``, the detached per-token entropies).

        The engine samples from the same tempered distribution, so at equal weights these
        match its behaviour log-probs (top-p, if the engine used it, is not re-applied here:
        its effect shows up in the training-inference mismatch term).
        """
        logits = self.response_logits(input_ids, attention_mask, prompt_len).float()  # (B, T, V)
        if temperature != 1.0:
            logits = logits / temperature
        logprobs = F.log_softmax(logits, dim=-1)
        targets = input_ids[:, prompt_len:]
        logp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
        entropy = None
        if with_entropy:  # a diagnostic: no graph
            with torch.no_grad():
                entropy = -(logprobs.exp() * logprobs).sum(-1)  # (B, T)
        return logp, entropy

    def response_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """Logits (B, T, V) that predict the response tokens. Rows sharing a prompt (a GRPO group) run
        it once on the tiny GPT (``offpolicy.policy.prefix``); otherwise one plain forward pass."""
        if isinstance(self.model, TinyGPT) and input_ids.shape[0] > 1 and prompt_len > 0:
            from offpolicy.policy.prefix import shared_prompt_logits, unique_prompts

            groups = unique_prompts(input_ids[:, :prompt_len], attention_mask[:, :prompt_len])
            if len(groups[0]) < input_ids.shape[0]:
                return shared_prompt_logits(self.model, input_ids, attention_mask, prompt_len, groups)
        return self.logits(input_ids, attention_mask)[:, prompt_len - 1 : -1]

    # ---- bookkeeping ---------------------------------------------------------------------
    def parameters(self):
        return self.model.parameters()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def copy(self, requires_grad: bool = False) -> "Policy":
        """A frozen deep copy (reference or proximal model)."""
        model = copy.deepcopy(self.model)
        for p in model.parameters():
            p.requires_grad_(requires_grad)
        return Policy(model, self.tokenizer, self.kind)

    def save(self, directory: str | Path) -> None:
        """Write the weights (safetensors), config and tokenizer into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.kind == "tiny":
            state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
            save_file(state, str(directory / "model.safetensors"))
            (directory / "config.json").write_text(json.dumps(self.model.cfg.to_dict(), indent=2))
            self.tokenizer.save(directory)
        else:
            self.model.save_pretrained(directory, safe_serialization=True)
            self.tokenizer.hf.save_pretrained(directory)  # type: ignore[attr-defined]


def build_tiny(cfg: TinyConfig | None = None, tokenizer: CharTokenizer | None = None, seed: int = 0) -> Policy:
    """A freshly initialised tiny GPT with the character tokenizer."""
    tokenizer = tokenizer or CharTokenizer()
    cfg = cfg or TinyConfig()
    cfg.vocab_size = tokenizer.vocab_size
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TinyGPT(cfg)
    return Policy(model, tokenizer, "tiny")


def load_policy(path: str | Path, *, dtype: str = "float32") -> Policy:
    """Load a tiny checkpoint folder, or any Hugging Face causal LM (local folder or hub id)."""
    p = Path(path)
    config_file = p / "config.json"
    if p.is_dir() and config_file.exists():
        try:
            cfg = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
        if cfg.get("model_type") == "offpolicy-tiny":
            if (p / "manifest.json").exists():  # a training checkpoint: its checksums are checked first
                from offpolicy.train.checkpoint import verify_checkpoint

                verify_checkpoint(p)
            return _load_tiny(p, cfg)
    elif p.is_dir():
        raise CheckpointError(f"{p} has no config.json: not a tiny or Hugging Face checkpoint folder")
    elif p.exists():
        raise CheckpointError(f"{p}: a checkpoint is a folder, not a file")
    elif str(path).startswith((".", "/")) and not p.exists():
        raise CheckpointError(f"checkpoint folder {p} does not exist")
    from offpolicy.policy.hf import load_hf_policy

    return load_hf_policy(str(path), dtype=dtype)


def _load_tiny(directory: Path, cfg: dict) -> Policy:
    try:
        tiny_cfg = TinyConfig(**cfg)
    except TypeError as e:
        raise CheckpointError(f"{directory / 'config.json'}: {e}") from None
    tokenizer = CharTokenizer.load(directory)
    if tokenizer.vocab_size != tiny_cfg.vocab_size:
        raise CheckpointError(
            f"{directory}: tokenizer has {tokenizer.vocab_size} tokens but config.json says vocab_size={tiny_cfg.vocab_size}"
        )
    model = TinyGPT(tiny_cfg)
    weights = directory / "model.safetensors"
    if not weights.exists():
        raise CheckpointError(f"{directory}: no model.safetensors")
    load_weights(model, load_file(str(weights)), source=str(weights))
    return Policy(model, tokenizer, "tiny")


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` with one readable error naming what does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:5]))
        raise CheckpointError(f"{source} does not fit this model: " + ", ".join(parts))
    model.load_state_dict(state)
