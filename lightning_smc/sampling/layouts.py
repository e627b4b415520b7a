"""Particle layouts: where the ``N`` particles of each prompt live during one ``SMCSampler`` run.

``SMCSampler(..., layout=...)`` takes ``"local"`` (the default, ``LocalParticles``: all ``N``
particles in this process) or ``"sharded"`` / ``ParticleShards(group)``: the particles of every
prompt split over the ``W`` ranks of a ``torch.distributed`` process group, for when ``N`` of
them do not fit one device. Notation as in ``sampler`` and ``smc.exchange``: rank ``r`` holds
the global slots ``r * n .. (r + 1) * n - 1`` (``n = N / W``) of each of the ``B`` prompts as its
local rows ``x [B * n, L]`` (with their twists ``log gamma_t`` and base log-probs), while
``log_w [B, N]``, ``log Ẑ`` and the diagnostics (ESS, resampled, ancestors) are **global and
identical on every rank**. Per step:

- **weights**: the local increments ``[B * n]`` (twist differences and move weights) are queued
  by ``add`` and all-gathered into ``[B, N]`` by ``settle`` right before ``log_w`` is read (ESS,
  resampling, the end): one small float64 ``all_gather`` per step, added in the same order as
  the single-process sampler adds them;
- **resampling** runs on the same ``log_w`` with a per-prompt generator that is the same on
  every rank, so every rank draws the same global ancestors ``A [B, N]``; ``follow`` then
  gathers the rows whose ancestor is local and exchanges **only** the others, point to point
  (``batch_isend_irecv``; each particle crosses once per destination rank, see
  ``smc.plan_exchange``), with their tokens and twist. Their base log-probs are not shipped
  (``[L, V]`` per row): the receiver evaluates the denoiser on those rows (counted in ``nfe``);
- **moves** (token uniforms, unmasking uniforms, a potential's ``x0`` samples) draw from
  per-(prompt, rank) generators seeded ``derive_seed(s_b, rank)`` with ``s_b`` one draw from
  prompt ``b``'s generator (checked equal on all ranks), so ranks propose independently;
- at the end ``tokens`` are all-gathered into ``[B, N, L]`` in global slot order: every rank
  returns the same full ``SMCOutput`` and ``out.best()`` works anywhere.

The target and the distribution of the results are those of single-process SMC with ``N``
particles (the same algorithm; only where rows are stored changes). With ``W = 1`` the results
are bit-identical to ``layout="local"``. ``cache=True`` works (cached rows follow their
ancestors; received rows are evaluated afresh); ``record_path=True`` is refused (the path would
hold one rank's rows). Tensors stay on the sampler's device, so the backend must support it
(``gloo`` on CPU, ``nccl`` on CUDA).

Example (every rank runs the same code with the same seed)::

    torch.distributed.init_process_group("gloo")
    shards = ParticleShards()
    sampler = SMCSampler(denoiser, num_particles=64, potential=SelfReward(), layout=shards)
    out = sampler.sample(seq_len=32, generator=torch.Generator().manual_seed(0))
    out.tokens.shape, shards.rows_sent  # [1, 64, 32] on every rank; rows this rank sent
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..smc import RowGenerators, derive_seed, plan_exchange
from .cache import CachedDenoiser
from .context import StepContext, index_rows

__all__ = ["LAYOUTS", "LocalParticles", "ParticleShards", "get_layout"]


class LocalParticles:
    """All ``N`` particles of every prompt in this process: the default layout, and the interface
    every layout implements (``ParticleShards`` overrides each method)."""

    world_size, rank = 1, 0

    def start(self, num_particles: int, device: torch.device, record_path: bool) -> int:
        """Check the run's settings; returns ``n``, the particles of each prompt held here."""
        return num_particles

    def generators(self, rows: RowGenerators) -> tuple[RowGenerators, RowGenerators]:
        """``(resampling, moves)`` generators, one per prompt each (here: the same ones)."""
        return rows, rows

    def add(self, log_w: Tensor, increment: Tensor) -> None:
        """``log_w [B, N] += increment``, given per local row ``[B * n]``."""
        log_w += increment.view(log_w.shape)

    def settle(self, log_w: Tensor) -> None:
        """Bring ``log_w`` up to date before it is read (nothing is pending here)."""

    def accumulate(self, total: Tensor, increment: Tensor) -> None:
        """``total [B, N] += increment [B * n]`` for a running per-particle sum other than the
        weights (the log-confidence); brought up to date by ``settle_sum`` before it is read."""
        total += increment.view(total.shape)

    def settle_sum(self, total: Tensor) -> None:
        """Bring a sum kept with ``accumulate`` up to date (nothing is pending here)."""

    def any(self, flag: bool) -> bool:
        """``flag`` on any rank."""
        return flag

    def total(self, count: int) -> int:
        """``count`` summed over ranks."""
        return count

    def follow(
        self,
        index: Tensor,
        ctx: StepContext,
        prev_twist: Tensor,
        base_lp: Tensor,
        network: CachedDenoiser,
        origin: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Rows follow their ancestors (``index [B * n]``: the local row each comes from).

        Returns ``(x, prev_twist, base_lp, index)``; without the cache the log-probs are not
        gathered and ``index`` is passed on for the sampler to read through. Stateful networks
        are told ``origin`` (default ``index``: where each row's state comes from, ``-1`` for a
        row received from another process)."""
        x, prev_twist = ctx.x_t[index], prev_twist[index]
        network.reorder_state(index if origin is None else origin)
        if network.enabled:  # the cache's rows must follow their ancestors
            return x, prev_twist, network.reorder(index), None
        return x, prev_twist, base_lp, index

    def tokens(self, x: Tensor, B: int) -> Tensor:
        """All particles ``[B, N, L]`` from the local rows ``x [B * n, L]``."""
        return x.view(B, -1, x.shape[-1])


class ParticleShards(LocalParticles):
    """The ``N`` particles of each prompt split over the ranks of ``group`` (default: the world).

    ``N`` must be divisible by the group's size; ``torch.distributed`` must be initialized when
    ``sample`` is called, and every rank must call it with the same arguments and equally seeded
    generators. ``rows_sent`` / ``rows_received`` count the particle rows this rank exchanged in
    its last run (only rows whose ancestor lives on another rank travel)."""

    def __init__(self, group: Any = None):
        self.group = group
        self.rows_sent = self.rows_received = 0
        self._pending: list[Tensor] = []
        self._sums: dict[int, list[Tensor]] = {}  # accumulate: pending increments per sum

    def start(self, num_particles: int, device: torch.device, record_path: bool) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "ParticleShards (layout='sharded') needs torch.distributed: call "
                "torch.distributed.init_process_group(...) on every rank before sample(), or use "
                "layout='local'"
            )
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        if num_particles % self.world_size:
            raise ValueError(
                f"num_particles={num_particles} is not divisible by the world size "
                f"{self.world_size}: each rank must hold num_particles / world_size particles"
            )
        if record_path:
            raise ValueError(
                "record_path=True is not supported with sharded particles (the path would hold "
                "one rank's rows only); sample with layout='local' to record paths"
            )
        self.device, self.rows_sent, self.rows_received = torch.device(device), 0, 0
        self._pending, self._sums = [], {}
        return num_particles // self.world_size

    def generators(self, rows: RowGenerators) -> tuple[RowGenerators, RowGenerators]:
        if self.world_size == 1:
            return rows, rows
        seeds = [
            int(torch.randint(0, 2**62, (1,), generator=g, device=g.device))
            for g in rows.generators
        ]
        everyone = self._gather(torch.tensor(seeds, device=self.device))
        if not all(torch.equal(everyone[0], other) for other in everyone[1:]):
            raise ValueError(
                "sharded particles need the same generator(s) on every rank (resampling must draw "
                "the same ancestors everywhere): seed them identically, e.g. "
                "torch.Generator().manual_seed(seed) with one seed for all ranks"
            )
        moves = [derive_seed(s, self.rank) for s in seeds]
        return rows, RowGenerators.from_seeds(moves, rows.generator(0).device)

    def add(self, log_w: Tensor, increment: Tensor) -> None:
        self._pending.append(increment)

    def settle(self, log_w: Tensor) -> None:
        pending, self._pending = self._pending, []
        self._add_gathered(log_w, pending)

    def accumulate(self, total: Tensor, increment: Tensor) -> None:
        self._sums.setdefault(id(total), []).append(increment)

    def settle_sum(self, total: Tensor) -> None:
        self._add_gathered(total, self._sums.pop(id(total), []))

    def _add_gathered(self, total: Tensor, pending: list[Tensor]) -> None:
        """``total [B, N] +=`` the local increments ``pending`` of every rank, in order."""
        if not pending:
            return
        B, N = total.shape
        k = len(pending)
        parts = self._gather(torch.stack(pending))  # W x [k, B * n]
        full = torch.stack([p.view(k, B, -1) for p in parts], dim=2).view(k, B, N)
        for increment in full:  # in order, as the single-process sampler adds them
            total += increment

    def any(self, flag: bool) -> bool:
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value.item())

    def total(self, count: int) -> int:
        value = torch.tensor([count], dtype=torch.int64, device=self.device)
        dist.all_reduce(value, group=self.group)
        return int(value.item())

    def follow(self, index, ctx, prev_twist, base_lp, network):
        """``index [B * N]``: global rows ``b * N + ancestor``, the same on every rank. Rows whose
        ancestor lives here are gathered locally; the others arrive from their rank (tokens and
        twist), are evaluated by the denoiser, and are written into ``base_lp`` in place, in rows
        that no slot reads any more."""
        B, L = len(ctx.rows), ctx.x_t.shape[1]
        N = ctx.num_particles * self.world_size
        ex = plan_exchange(index.view(B, N) % N, self.world_size, self.rank)
        self.rows_sent += ex.rows_sent
        self.rows_received += ex.rows_received
        # one message per peer: the tokens and the float64 twist's bits, as int64 [rows, L + 1]
        payload = torch.cat([ctx.x_t, prev_twist.view(torch.int64).unsqueeze(1)], dim=1)
        received = self._exchange(payload, ex)
        local = torch.empty(len(payload), dtype=torch.long, device=index.device)  # row read by slot
        local[ex.keep_to] = ex.keep_from
        origin = local.clone()
        if ex.rows_received:
            # Received particles are written into rows no slot keeps (at least one per received
            # particle: its slots keep nothing), so the [rows, L, V] log-probs are never copied.
            unused = torch.ones_like(local, dtype=torch.bool)
            unused[ex.keep_from] = False
            free, start = unused.nonzero().squeeze(1), 0
            x, prev_twist = ctx.x_t.clone(), prev_twist.clone()
            for p, message in enumerate(received):
                if message is None:
                    continue
                rows, start = free[start : start + len(message)], start + len(message)
                to, pos = ex.recv_to[p], ex.recv_pos[p]
                home = pos.new_empty(len(message))  # a row of each received particle's prompt
                home[pos] = to
                x[rows] = message[:, :L]
                prev_twist[rows] = message[:, L].contiguous().view(torch.float64)
                if not network.stateful:  # (stateful: all rows are evaluated below)
                    cond = index_rows(ctx.cond, home)
                    base_lp[rows] = network.evaluate(message[:, :L], ctx.t[home], cond)
                local[to] = rows[pos]
                origin[to] = -1
            ctx.x_t = x
            network.adopt(x, base_lp)
        moved = super().follow(local, ctx, prev_twist, base_lp, network, origin)
        if ex.rows_received and network.stateful:
            # a stateful network must see every row: evaluate them all in their new order
            fresh = network.evaluate(moved[0], ctx.t, ctx.cond)
            return moved[0], moved[1], fresh, None
        return moved

    def tokens(self, x: Tensor, B: int) -> Tensor:
        parts = self._gather(x.contiguous())
        return torch.stack([p.view(B, -1, x.shape[-1]) for p in parts], dim=1).flatten(1, 2)

    # ------------------------------------------------------------------ communication
    def _gather(self, value: Tensor) -> list[Tensor]:
        parts = [torch.empty_like(value) for _ in range(self.world_size)]
        dist.all_gather(parts, value, group=self.group)
        return parts

    def _exchange(self, payload: Tensor, ex) -> list[Tensor | None]:
        """Send ``payload[ex.send[p]]`` to every peer ``p``; returns what each peer sent here."""
        ops, received = [], [None] * self.world_size
        for p in range(self.world_size):
            peer = p if self.group is None else dist.get_global_rank(self.group, p)
            if ex.send[p].numel():
                ops.append(dist.P2POp(dist.isend, payload[ex.send[p]], peer, self.group))
            if ex.recv_count[p]:
                received[p] = payload.new_empty((ex.recv_count[p], payload.shape[1]))
                ops.append(dist.P2POp(dist.irecv, received[p], peer, self.group))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        return received


LAYOUTS = {"local": LocalParticles, "sharded": ParticleShards}


def get_layout(spec: str | LocalParticles) -> LocalParticles:
    """A layout from its name (``"local"``, ``"sharded"``) or a layout object, returned as is."""
    if isinstance(spec, LocalParticles):
        return spec
    if spec not in LAYOUTS:
        raise ValueError(
            f"layout={spec!r} is not a particle layout; use 'local', 'sharded' or a "
            "ParticleShards(group) object"
        )
    return LAYOUTS[spec]()
