"""Shared pieces of the diffusion LLM backbones (``llada``, ``dream``): loading, the denoiser
wrapper, rotary embeddings, tokenizers and chat prompts.

**Loading.** ``StrictLoading`` makes a ``PreTrainedModel`` subclass's ``from_pretrained`` strict:
a checkpoint (one ``model.safetensors`` or shards with ``model.safetensors.index.json``) whose
keys or shapes do not match the module exactly is an error naming the missing, unexpected and
mismatched keys, never a model with silently re-initialized weights. Loading is local-files-only
by default (``local_files_only=False`` fetches a Hub id's weights) and ``trust_remote_code`` is
refused: the Hub's ``modeling_*.py`` is never imported. ``dtype`` defaults to the checkpoint's
``torch_dtype`` (bf16 for the Hub models); pass ``dtype=torch.float32`` to upcast.

**Denoiser.** ``DiffusionLMDenoiser`` wraps a backbone ``(input_ids, attention_mask) -> logits``
into ``ls.Denoiser``: ``(x_t [B, L], t [B], cond) -> logits [B, L, vocab_size]`` in float32
with the mask logit ``-inf`` (the mask is never a clean value) and, for a model that predicts
token ``i`` at position ``i - 1`` (Dream), the logits shifted right by one so that row ``i``
scores token ``i`` (row 0 repeats row 0). ``t`` is ignored: these models are not
time-conditioned. The prompt is the clean prefix of ``x_t`` (``SMCSampler.sample(prompt=...)``
writes it there); prompts of different lengths are **left-padded** and ``cond`` carries their
``attention_mask`` ``[B, P]`` (``1`` = token, ``0`` = padding; positions after ``P`` count as
``1``), as a tensor or as ``{"attention_mask": ...}``; the sampler keeps it with the particles.

**End tokens.** A denoiser declares ``eos_id`` (a tuple, what ``SMCSampler(stop_at_eos=True)``
and ``methods.complete_prompts`` read), built from its config alone: the config's
``eos_token_id`` (an id or a list), then the model family's end-of-turn ids
(``hub_end_of_turn``: LLaDA ``<|eot_id|>`` 126348; Dream ``<|endoftext|>`` 151643 and
``<|im_end|>`` 151645) when the config's vocabulary is the Hub models' (``hub_vocab_size``), so
that an instruct model stops at the end of its turn even when its config names only
``<|endoftext|>``. An id the model cannot emit (outside ``[0, vocab_size)``, or the mask id) is
not an end token of that model and is left out (a tiny model built with a Hub config's default
ids). This is the one source of truth; ``models.loading.load_model`` only *adds* the end tokens
of a checkpoint's own tokenizer that the config does not name (a model trained here with
another tokenizer), and ``eos_id`` may be assigned to override it.

**Tokenizers.** ``load_dllm_tokenizer(folder)`` loads a Hub tokenizer folder through
``AutoTokenizer`` from local files (a ``tokenizer_class`` that only the Hub's remote code
defines, such as Dream's ``DreamTokenizer`` -- Qwen2's byte-level BPE -- falls back to
``Qwen2Tokenizer`` on the same ``vocab.json`` / ``merges.txt``). ``prompt_ids`` applies the chat
template of an instruct model; ``prompt_batch`` left-pads several prompts::

    tok = load_dllm_tokenizer("checkpoints/LLaDA-8B-Instruct")
    ids, attention_mask = prompt_batch(tok, ["What is 2 + 3?", "Name a prime."])
    out = sampler.sample(seq_len=ids.shape[1] + 256, prompt=ids, cond={"attention_mask": attention_mask})
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "DiffusionLMDenoiser",
    "StrictLoading",
    "load_dllm_tokenizer",
    "prompt_batch",
    "prompt_ids",
    "rotary_cos_sin",
]


class StrictLoading:
    """Mixin for ``PreTrainedModel`` subclasses: ``from_pretrained`` refuses remote code and
    any mismatch between the checkpoint's keys and the module's."""

    @classmethod
    def from_pretrained(cls, path: str | Path, *args: Any, **kwargs: Any):
        if kwargs.pop("trust_remote_code", False):
            raise ValueError(
                f"{cls.__name__} is a native implementation: trust_remote_code is never used"
            )
        if Path(path).exists() and not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json (expected a Hub checkpoint folder)")
        kwargs.setdefault("local_files_only", True)
        kwargs["output_loading_info"] = True
        # Mismatched shapes come back in the loading info (and are refused below), not as
        # transformers' error that points to a log.
        kwargs["ignore_mismatched_sizes"] = True
        model, info = super().from_pretrained(path, *args, **kwargs)
        problems = {
            "missing keys": sorted(info["missing_keys"]),
            "unexpected keys": sorted(info["unexpected_keys"]),
            "mismatched shapes (key, checkpoint, module)": [
                tuple(map(str, m)) for m in info.get("mismatched_keys") or []
            ],
            "errors": list(info.get("error_msgs") or []),
        }
        found = "; ".join(f"{what} {items}" for what, items in problems.items() if items)
        if found:
            raise ValueError(
                f"{path} does not hold a {cls.__name__} checkpoint in the Hub's layout: {found}"
            )
        return model.eval()


def rotary_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """float32 ``cos, sin`` ``[..., L, head_dim]`` of non-interleaved RoPE (``rotate_half``:
    the two halves of a head form the rotated pairs) at integer ``positions [..., L]``."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = 1.0 / theta ** (exponents / head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def attention_mask_of(cond: Any, x_t: Tensor) -> Tensor | None:
    """The ``[B, L]`` 0/1 mask of ``cond`` (``None``, a tensor or ``{"attention_mask": ...}``),
    ``None`` when nothing is padded."""
    mask = cond.get("attention_mask") if isinstance(cond, dict) else cond
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dim() != 2 or mask.shape[0] != x_t.shape[0]:
        raise ValueError(
            "cond must be None, an attention mask [B, P] or {'attention_mask': [B, P]} "
            f"(1 = token, 0 = left padding) for inputs {tuple(x_t.shape)}; got "
            f"{type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}"
        )
    if mask.shape[1] > x_t.shape[1]:
        raise ValueError(f"attention mask of length {mask.shape[1]} for inputs of {x_t.shape[1]}")
    mask = mask.to(x_t.device).long()
    full = torch.ones_like(x_t)
    full[:, : mask.shape[1]] = mask
    return None if bool(full.all()) else full


class DiffusionLMDenoiser(nn.Module):
    """``ls.Denoiser`` over a diffusion LLM backbone (see the module docstring)."""

    #: True when the backbone predicts token ``i`` at position ``i - 1`` (Dream)
    shifted = False
    #: the Hub instruct models' end-of-turn ids, declared at the Hub's vocabulary size only
    hub_end_of_turn: tuple[int, ...] = ()
    hub_vocab_size: int | None = None

    def __init__(
        self,
        model: nn.Module,
        mask_id: int,
        vocab_size: int,
        eos_id: int | Sequence[int] | None = None,
    ):
        super().__init__()
        self.model, self.mask_id, self.vocab_size = model, int(mask_id), int(vocab_size)
        if not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(f"mask_id={mask_id} is not in [0, vocab_size={vocab_size})")
        #: the end tokens (module docstring, "End tokens")
        self.eos_id: tuple[int, ...] = self.declared_end_tokens(eos_id)

    def declared_end_tokens(self, eos_id: int | Sequence[int] | None) -> tuple[int, ...]:
        """``eos_id`` (the config's ``eos_token_id``) and, at the Hub's vocabulary size, the
        family's end-of-turn ids: the ones the model can emit, in that order, without repeats."""
        ids = [] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id)
        if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise TypeError(f"eos_token_id must be an int or a list of ints, got {eos_id!r}")
        if self.vocab_size == self.hub_vocab_size:
            ids += self.hub_end_of_turn
        ends: list[int] = []
        for i in ids:
            if 0 <= i < self.vocab_size and i != self.mask_id and i not in ends:
                ends.append(i)
        return tuple(ends)

    def forward(self, x_t: Tensor, t: Tensor | None = None, cond: Any = None) -> Tensor:
        if x_t.dim() != 2 or x_t.is_floating_point() or x_t.dtype == torch.bool:
            raise ValueError(f"x_t must be integer token ids [B, L], got {x_t.dtype} {x_t.shape}")
        return self.finish(
            self.model(x_t.long(), attention_mask=attention_mask_of(cond, x_t)).logits
        )

    def save_pretrained(self, path: str | Path, **kwargs: Any) -> None:
        """The backbone's ``save_pretrained`` (what ``fit`` and ``export`` write)."""
        self.model.save_pretrained(path, **kwargs)

    def finish(self, logits: Tensor) -> Tensor:
        """The backbone's raw logits ``[B, L, width]`` as the denoiser's output (vocabulary
        columns in float32, shifted for a shifted model, mask ``-inf``)."""
        logits = logits[..., : self.vocab_size].float()  # embedding rows past the vocabulary
        if self.shifted:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        logits[..., self.mask_id] = -torch.inf
        return logits


def load_dllm_tokenizer(path: str | Path):
    """The tokenizer of a local Hub folder, without remote code (see the module docstring)."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (ValueError, OSError, KeyError, AttributeError) as err:
        if not ((path / "vocab.json").is_file() and (path / "merges.txt").is_file()):
            raise ValueError(f"{path}: AutoTokenizer cannot load this tokenizer ({err})") from err
        from transformers import Qwen2Tokenizer  # Dream's DreamTokenizer is Qwen2's BPE

        return Qwen2Tokenizer.from_pretrained(path, local_files_only=True)


def prompt_ids(
    tokenizer: Any, prompt: str | Sequence[dict[str, str]], chat: bool | None = None
) -> list[int]:
    """Token ids of one prompt: a user message (``str``) or a list of chat messages. ``chat``:
    apply the tokenizer's chat template with the generation prompt (``None``: when it has one,
    i.e. an instruct model); otherwise encode the text as the tokenizer does by default."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    chat = has_template if chat is None else chat
    if chat and not has_template:
        raise ValueError("chat=True but the tokenizer has no chat_template (a base model?)")
    if chat:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if not isinstance(prompt, str):
        raise ValueError("chat messages need chat=True and a tokenizer with a chat_template")
    return tokenizer(prompt)["input_ids"]


def prompt_batch(
    tokenizer: Any,
    prompts: Sequence[str | Sequence[dict[str, str]]],
    chat: bool | None = None,
    mask_id: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``(ids [B, P], attention_mask [B, P])``: the prompts' ids left-padded with the
    tokenizer's pad id (its EOS when it has none) and ``0`` over the padding."""
    rows = [prompt_ids(tokenizer, p, chat) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to left-pad with")
    if mask_id is not None and pad == mask_id:
        raise ValueError(f"the pad id {pad} is the mask id: padding would be generated")
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), P), dtype=torch.long)
    for b, row in enumerate(rows):
        if row:
            ids[b, P - len(row) :] = torch.tensor(row)
            mask[b, P - len(row) :] = 1
    return ids, mask
