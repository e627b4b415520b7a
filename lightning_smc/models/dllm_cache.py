"""Fast-dLLM's KV caches for block decoding (Wu et al. 2025), as per-row denoiser state.

``CachedDiffusionLM(denoiser, mode, block_length)`` wraps a ``LLaDADenoiser`` or
``DreamDenoiser`` (any ``DiffusionLMDenoiser`` whose backbone exposes ``layers()``, ``embed``,
``positions``, ``rotary`` and ``head``, the pieces of its ``forward``) and is itself an
``ls.Denoiser`` that keeps the keys and values of every layer between calls::

    denoiser = CachedDiffusionLM(LLaDADenoiser.from_pretrained(path), "dual", block_length=32)
    sampler = SMCSampler(denoiser, num_particles=4, num_steps=256, unmasking="threshold",
                         block_length=32, potential=SelfReward())

Notation: rows ``x_t [R, L]``, the current block ``[b, e)``; ``z`` = ``x_t`` with every position
from ``b`` on masked (the state of the sequence when the block opened, in semi-autoregressive
decoding from a clean prompt).

**Blocks.** The sampler does not hand the block to the denoiser; it is inferred. A block
*opens* when the sampler's block-local time is ``t = 1`` (the first step of every block) or
when the current block has no mask left in any row (for callers whose ``t`` does not mark
blocks); it then starts at the first masked position of the batch, ``b``, and ends at
``e = min(b + block_length, L)`` (``block_length`` must be the sampler's; ``None``: ``e = L``).

**What is cached.** When a block opens, one full forward on ``z`` gives exact logits (returned
for that step) and the keys (after RoPE: positions are absolute and never move, so rotating once
is the same as rotating the reference's pre-RoPE keys at every call) and values of every layer at
every position. Until the next block opens, a call runs the network on the positions
``[q0, q1)`` only, whose queries attend to the cached keys/values elsewhere and to fresh ones
inside:

- ``mode="prefix"``: ``[q0, q1) = [b, L)`` (the block and everything after it);
- ``mode="dual"``: ``[q0, q1) = [b, e)`` (the block only; the suffix's keys/values are cached too).

A model that predicts token ``i`` at position ``i - 1`` (Dream) also recomputes ``b - 1``, so that
the block's first token is scored by its true row (Fast-dLLM's Dream code reuses the block's own
first row there). Outside ``[q0, q1)`` the returned logits are those of the opening forward:
block decoding never reads them (the prefix is clean, the suffix is not drawn from before its
block opens). ``refresh="step"`` rebuilds the cache from ``x_t`` itself at every call (then the
split forward equals the full one: no approximation; for tests and debugging).

**What is exact and what is not.** With bidirectional attention the keys/values of a position at
layer ``l >= 2`` depend on every token of the sequence, so both caches are approximations:
the cached prefix (and, for ``dual``, suffix) keys/values ignore the tokens committed inside the
block since it opened. Exact are: the first step of every block (a full forward); the first
layer's keys/values (functions of each token alone), so a one-layer model is served exactly by
both caches (the suffix is all masks from the opening until its own block opens); and
``refresh="step"``. The approximation is a fixed function: the logits of a call depend on
``x_t`` alone (through ``z``, ``b`` and ``e``), so the cached network is a well-defined denoiser
``p_cache(x0 | x_t)``. The sampler's weights use the logits it is given, so they are exact for
that cached model (SR-SMC's target is then defined through ``p_cache``, not ``p_theta``); they
are not importance weights for the uncached model.

**Output buffer (aliasing).** The opening forward's raw logits ``[R, L, width]`` stay in the
state in float32 (converted once when the block opens, exactly, from a bf16 model's), and a
call writes the fresh rows ``[q0, q1)`` over them in place (``narrow(1, q0, q1 - q0).copy_``,
converting only those rows) and returns the denoiser's ``finish`` of that buffer, which with no
column past the vocabulary *is* the buffer (its mask column set to ``-inf`` in place; a shifted
model's comes back as a shifted copy): no ``[R, L, V]`` concatenation, and no full-length
float32 conversion, is materialised per call. So a returned tensor is valid
until the next call, which overwrites its window, and must not be written to (the rows
outside the window are the cache's). ``SMCSampler`` obeys both: it reads one step's logits
before the next call and never writes to a stateful network's output (``sampling.cache``
normalizes into its own buffer; the sharded layout writes received rows into ``base_lp`` only
for stateless networks, and re-evaluates all rows of a stateful one). ``reorder_state``
moves the rows into a new buffer, so a tensor returned before a resample is left as it was.

**Particles.** ``reorder_state(index)`` (``models.base``) moves the cache's rows with the
particles: after every resample (inside a block too) row ``r`` takes row ``index[r]``'s keys,
values, opening state and logits; ``-1`` marks a row received from another process, rebuilt
from its own ``z`` at the next call (the same cache it had, since the cache is a function of
``z``). A row whose prefix ``x_t[:b]`` or attention mask is not the one its cache was built
for is also rebuilt (a new run, an unannounced move), so results never depend on stale rows;
``rebuilt_rows`` counts such rebuilds (none after resampling when the moves are announced),
``received_rows`` the rows announced with ``-1``, ``openings`` the blocks opened.
Left-padding masks come through ``cond`` as for the uncached denoiser.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dllm import DiffusionLMDenoiser, attention_mask_of

__all__ = ["CachedDiffusionLM"]

Mode = Literal["prefix", "dual"]
Refresh = Literal["block", "step"]


@dataclass
class KVState:
    """The cache of ``R`` rows: per layer ``keys`` / ``values`` ``[R, kv_heads, L, hd]``, the
    opening state ``tokens [R, L]`` (``z``), the attention ``mask [R, L]`` (or ``None``), the
    raw ``logits [R, L, width]`` in float32 (the opening forward's, with the last call's window
    written over them: the output buffer), ``valid [R]`` and the block ``[b, e)``."""

    keys: list[Tensor]
    values: list[Tensor]
    tokens: Tensor
    mask: Tensor | None
    logits: Tensor
    valid: Tensor
    b: int
    e: int

    def rows(self, index: Tensor) -> KVState:
        """The state with row ``r`` taken from row ``index[r]`` (``-1``: invalid)."""
        source = index.clamp_min(0)
        take = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("b", "e", "valid")
        }
        moved = {
            name: [v.index_select(0, source) for v in value]
            if isinstance(value, list)
            else (None if value is None else value.index_select(0, source))
            for name, value in take.items()
        }
        return KVState(**moved, valid=self.valid[source] & (index >= 0), b=self.b, e=self.e)


class CachedDiffusionLM(nn.Module):
    """``ls.Denoiser`` over a ``DiffusionLMDenoiser`` with Fast-dLLM's prefix or dual KV cache
    (see the module docstring)."""

    def __init__(
        self,
        denoiser: DiffusionLMDenoiser,
        mode: Mode = "prefix",
        block_length: int | None = None,
        refresh: Refresh = "block",
    ):
        super().__init__()
        if mode not in ("prefix", "dual"):
            raise ValueError(f"mode={mode!r}: use 'prefix' or 'dual'")
        if refresh not in ("block", "step"):
            raise ValueError(f"refresh={refresh!r}: use 'block' (Fast-dLLM) or 'step' (exact)")
        if block_length is not None and block_length < 1:
            raise ValueError(f"block_length must be >= 1 or None, got {block_length}")
        for piece in ("layers", "embed", "positions", "rotary", "head"):
            if not callable(getattr(denoiser.model, piece, None)):
                raise TypeError(
                    f"{type(denoiser.model).__name__} has no {piece}(): CachedDiffusionLM needs "
                    "a backbone exposing layers(), embed, positions, rotary and head (LLaDA, Dream)"
                )
        self.denoiser, self.mode, self.block_length, self.refresh = (
            denoiser,
            mode,
            block_length,
            refresh,
        )
        self.vocab_size, self.mask_id = denoiser.vocab_size, denoiser.mask_id
        self.state: KVState | None = None
        self.openings = self.rebuilt_rows = self.received_rows = 0

    @property
    def eos_id(self) -> Any:
        """The wrapped denoiser's end tokens (``stop_at_eos``); setting it sets the denoiser's."""
        return getattr(self.denoiser, "eos_id", None)

    @eos_id.setter
    def eos_id(self, value: Any) -> None:
        self.denoiser.eos_id = value

    # ------------------------------------------------------------------ the denoiser
    @torch.no_grad()
    def forward(self, x_t: Tensor, t: Tensor | None = None, cond: Any = None) -> Tensor:
        if x_t.dim() != 2 or x_t.is_floating_point() or x_t.dtype == torch.bool:
            raise ValueError(f"x_t must be integer token ids [B, L], got {x_t.dtype} {x_t.shape}")
        x_t, mask = x_t.long(), attention_mask_of(cond, x_t)
        masked = (x_t == self.mask_id).any(0)
        if not masked.any():  # nothing left to generate: no block, no cache
            return self.denoiser.finish(self._full(x_t, mask)[0])
        if self._opens(x_t, t, mask):
            b = int(masked.nonzero()[0])
            e = (
                x_t.shape[1]
                if self.block_length is None
                else min(b + self.block_length, len(masked))
            )
            z = self.opening_state(x_t, b)
            self.state = self._build(z if self.refresh == "block" else x_t, mask, b, e)
            self.openings += 1
            if self.refresh == "block" and torch.equal(z, x_t):
                return self.denoiser.finish(self.state.logits)  # the full forward
        elif self.refresh == "step":
            self.state = self._build(x_t, mask, self.state.b, self.state.e)
        else:
            self._rebuild_stale(x_t, mask)
        return self.denoiser.finish(self._split(x_t, mask))

    def reorder_state(self, index: Tensor) -> None:
        """Row ``r`` now holds what row ``index[r]`` held (``-1``: rebuild it)."""
        state = self.state
        self.received_rows += int((index < 0).sum())
        if state is None or (len(index) and int(index.max()) >= len(state.tokens)):
            self.state = None  # rows of another run: rebuilt when the next block opens
            return
        self.state = state.rows(index.to(state.tokens.device))

    def opening_state(self, x_t: Tensor, b: int) -> Tensor:
        """``z``: ``x_t`` with every position from ``b`` on masked."""
        z = x_t.clone()
        z[:, b:] = self.mask_id
        return z

    # ------------------------------------------------------------------ the cache
    def _opens(self, x_t: Tensor, t: Tensor | None, mask: Tensor | None) -> bool:
        state = self.state
        if state is None or state.tokens.shape != x_t.shape:
            return True
        if (state.mask is None) != (mask is None):
            return True
        if t is not None and bool((t >= 1).any()):
            return True
        return not bool((x_t[:, state.b : state.e] == self.mask_id).any())

    def _stale_rows(self, x_t: Tensor, mask: Tensor | None) -> Tensor:
        state = self.state
        same = (x_t[:, : state.b] == state.tokens[:, : state.b]).all(1) & state.valid
        if mask is not None:
            same &= (mask == state.mask).all(1)
        return (~same).nonzero().flatten()

    def _rebuild_stale(self, x_t: Tensor, mask: Tensor | None) -> None:
        """Rebuild the rows whose cache was built for another prefix (or marked ``-1``)."""
        rows = self._stale_rows(x_t, mask)
        if not len(rows):
            return
        state, sub = self.state, None if mask is None else mask[rows]
        fresh = self._build(self.opening_state(x_t[rows], state.b), sub, state.b, state.e)
        for name in ("keys", "values"):
            for old, new in zip(getattr(state, name), getattr(fresh, name), strict=True):
                old[rows] = new
        state.tokens[rows], state.logits[rows] = fresh.tokens, fresh.logits
        if mask is not None:
            state.mask[rows] = sub
        state.valid[rows] = True
        self.rebuilt_rows += len(rows)

    def _build(self, x: Tensor, mask: Tensor | None, b: int, e: int) -> KVState:
        logits, keys, values = self._full(x, mask, keep=True)
        valid = torch.ones(len(x), dtype=torch.bool, device=x.device)
        # float32 once (exact from bf16): a call then converts only its window's rows
        return KVState(keys, values, x.clone(), mask, logits.float(), valid, b, e)

    # ------------------------------------------------------------------ forwards
    def _full(self, x: Tensor, mask: Tensor | None, keep: bool = False):
        """Raw logits of a full forward, and (``keep``) every layer's keys and values."""
        model, keys, values = self.denoiser.model, [], []
        h = model.embed(x)
        rope = model.rotary(h, model.positions(x, mask))
        key_mask = None if mask is None else mask.bool()[:, None, None, :]
        for layer in model.layers():
            q, k, v = layer.qkv(h, rope)
            if keep:
                keys.append(k.contiguous())
                values.append(v.contiguous())
            h = layer.mix(h, _attend(q, k, v, key_mask))
        return model.head(h), keys, values

    def _split(self, x_t: Tensor, mask: Tensor | None) -> Tensor:
        """Raw logits with the positions ``[q0, q1)`` recomputed against the cache: the
        state's buffer, those rows overwritten in place (module docstring, "Output buffer")."""
        state, model = self.state, self.denoiser.model
        q0 = max(state.b - int(self.denoiser.shifted), 0)
        q1 = state.e if self.mode == "dual" else x_t.shape[1]
        h = model.embed(x_t[:, q0:q1])
        rope = model.rotary(h, model.positions(x_t, mask)[..., q0:q1])
        key_mask = None if mask is None else mask.bool()[:, None, None, :]
        for layer, keys, values in zip(model.layers(), state.keys, state.values, strict=True):
            q, k, v = layer.qkv(h, rope)
            keys[:, :, q0:q1], values[:, :, q0:q1] = k, v  # always rewritten before use
            h = layer.mix(h, _attend(q, keys, values, key_mask))
        # the window's rows written over the previous call's in place: no [R, L, width] per call
        state.logits.narrow(1, q0, q1 - q0).copy_(model.head(h))
        return state.logits


def _attend(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=key_mask, enable_gqa=q.shape[1] != k.shape[1]
    )
