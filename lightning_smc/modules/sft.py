"""``MaskedSFT``: LLaDA's supervised fine-tuning objective as a LightningModule.

A row is ``prompt || response`` (the response is the answer followed by EOS padding; see
``data.arithmetic``). Only the response is ever masked: draw ``t`` (antithetically, as in
``MDLMPretraining``), mask each response token independently with probability
``1 - alpha(t)`` (``~ t`` for the log-linear schedule), keep the prompt clean, and minimise

    L = E_t [ w(t) * sum_{i in response, x_t^i = mask} -log p_theta(x0^i | x_t) ] / |response|

with ``w(t) = 1/t`` (log-linear), normalized by the response length as LLaDA's SFT does. This
is ``masked_diffusion_loss`` with ``maskable`` = the response positions, so everything else --
the seeded per-step randomness (exact resume), AdamW with warm-up, the data module check, EMA
through ``EMAWeightAveraging`` -- is ``MDLMPretraining``'s. Batches are dicts
``{"input_ids": [B, L], "prompt_lengths": [B]}``; validation reports ``val/nll`` per response
token (the same bound, one seeded time draw per row).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..smc import derive_seed
from .pretrain import MDLMPretraining, masked_diffusion_loss

__all__ = ["MaskedSFT", "response_mask"]


def response_mask(batch: dict[str, Tensor]) -> Tensor:
    """``[B, L]`` bool: the positions at or after each row's ``prompt_lengths``."""
    if not isinstance(batch, dict) or "prompt_lengths" not in batch:
        raise ValueError(
            "MaskedSFT needs batches {'input_ids': [B, L], 'prompt_lengths': [B]} (e.g. from "
            "ArithmeticDataModule); got "
            + (f"keys {sorted(batch)}" if isinstance(batch, dict) else type(batch).__name__)
        )
    x0, P = batch["input_ids"], batch["prompt_lengths"].to(batch["input_ids"].device)
    if P.shape != (x0.shape[0],) or bool(((P < 0) | (x0.shape[1] <= P)).any()):
        raise ValueError(
            f"prompt_lengths {P.tolist()} must be one length in [0, {x0.shape[1]}) per row"
        )
    return torch.arange(x0.shape[1], device=x0.device) >= P[:, None]


class MaskedSFT(MDLMPretraining):
    """Supervised fine-tuning of a masked-diffusion LLM (LLaDA's SFT loss; see the module
    docstring). Arguments as ``MDLMPretraining``."""

    def _nll(self, batch, generator: torch.Generator) -> Tensor:
        x0, maskable = batch["input_ids"], response_mask(batch)
        return masked_diffusion_loss(
            self.denoiser, x0, self.schedule, generator, self.hparams.eps, maskable=maskable
        )

    def validation_step(self, batch, batch_idx: int) -> None:
        g = torch.Generator(device="cpu").manual_seed(derive_seed(self.hparams.seed, 1, batch_idx))
        nll = self._nll(batch, g)
        self.val_nll.update(nll, weight=response_mask(batch).sum(-1).float())
