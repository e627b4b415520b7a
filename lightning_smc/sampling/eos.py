"""Stopping a row at end-of-sequence (``SMCSampler(stop_at_eos=True)``; block decoding of LLMs).

A denoiser may declare ``eos_id``: one token id or a sequence of them (LLaDA: ``<|endoftext|>``
126081 and ``<|eot_id|>`` 126348; Dream: ``<|endoftext|>``). With ``stop_at_eos`` a row whose
current block, once it has no mask left, holds only end tokens at its generated positions is
*finished*: every masked position after that block is filled with the first end token
(``fill_id``). A finished row has no masked position left, so no later step draws, commits or
weighs anything in it; when no row of the run has a mask left the sampler stops before its
plan ends (``SMCOutput.steps`` counts the steps whose network was evaluated, ``nfe`` the rows
evaluated). With the logit cache (``cache=True``, a stateless denoiser) a finished row is never
evaluated again, as its tokens no longer change.

The fill is not drawn from the model and carries no weight: it is the same heuristic as the
reference dLLM decoders' early exit (an answer ends at its first all-end block), so the sampler
no longer targets the model's law over the filled positions. It is off by default, and MDLM
runs (no ``eos_id``) are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..diffusion import StepPlan

__all__ = ["EndOfSequence", "eos_ids_of"]


def eos_ids_of(denoiser: Any) -> tuple[int, ...]:
    """The end token ids ``denoiser`` declares (``eos_id``: an int or a sequence), as a tuple;
    an error naming the fix when it declares none."""
    value = getattr(denoiser, "eos_id", None)
    if value is None:
        raise ValueError(
            f"stop_at_eos=True needs the denoiser to declare its end token(s): set "
            f"{type(denoiser).__name__}.eos_id to an id or a list of ids (models.loading sets it "
            "for LLaDA / Dream folders), or use stop_at_eos=False"
        )
    ids = (value,) if isinstance(value, int) else tuple(value)
    vocab, mask_id = denoiser.vocab_size, denoiser.mask_id
    if not ids or not all(isinstance(i, int) and 0 <= i < vocab and i != mask_id for i in ids):
        raise ValueError(
            f"eos_id={value!r}: end token ids must be ints in [0, vocab_size={vocab}) other than "
            f"the mask id {mask_id}"
        )
    return ids


class EndOfSequence:
    """Finishes rows whose last completed block is all end tokens (module docstring)."""

    def __init__(self, ids: Sequence[int], mask_id: int, device: torch.device):
        self.ids = torch.tensor(list(ids), dtype=torch.long, device=device)
        self.fill_id, self.mask_id = int(ids[0]), mask_id

    def finish_rows(self, x: Tensor, plan: StepPlan, generated: Tensor) -> Tensor:
        """``x`` with the masks after the current block filled with ``fill_id`` in every row
        whose block is complete and all end tokens at its generated positions (a new tensor
        when a row is filled, else ``x`` itself)."""
        block = slice(plan.block_start, plan.block_end)
        xb, gen = x[:, block], generated[:, block]
        is_end = torch.isin(xb, self.ids)
        done = gen.any(1) & ~(xb == self.mask_id).any(1) & (is_end | ~gen).all(1)
        if not done.any():
            return x
        x = x.clone()
        tail = x[:, plan.block_end :]  # a view: the fill writes into the clone
        tail[done.unsqueeze(1) & (tail == self.mask_id)] = self.fill_id
        return x

    def all_done(self, x: Tensor) -> bool:
        """No row has a mask left (this process's rows)."""
        return not bool((x == self.mask_id).any())
