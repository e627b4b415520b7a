"""The log-variance objective of the amortized proposal (SMCamot), as plain functions.

For a transition ``x_t -> x_s`` that commits tokens at positions ``C`` under the reward tilt
``p_theta(x) exp(r(x) / alpha)`` with twist ``log gamma``,

    log w = log gamma_s(x_s) - log gamma_t(x_t)
            + sum_{i in C} [log p_theta(x_s^i | x_t) - log q_phi(x_s^i | x_t)]

(``transition_log_weights``), and the loss is ``mean((log w - F_psi(t))^2)``
(``log_variance_loss``) with ``F_psi`` a learned log-normalizer per time (``LogNormalizer``).
``AmortizedProposalModule`` (``modules.amortized``) trains ``q_phi`` and ``F_psi`` with them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..diffusion import inverse_cdf
from ..sampling.context import output_log_probs
from ..sampling.output import SMCPath

__all__ = [
    "LogNormalizer",
    "log_variance_loss",
    "paired_twist_change",
    "sibling_log_weights",
    "transition_log_weights",
]


class LogNormalizer(nn.Module):
    """``F_psi``: a learned log-normalizer per transition time (and condition).

    ``kind="per_step"``: one scalar per step index (``num_steps`` of them, zero-initialised);
    ``kind="mlp"``: ``MLP(sin/cos features of t)`` with a zero-initialised output layer;
    ``kind="mlp_cond"``: ``F_psi(t, c) = MLP([sin/cos features of t, E[c]])`` with ``E`` an
    embedding of the class label ``c`` (``num_classes + 1`` rows, the last one for
    ``cond=None``, the unconditional input), zero-initialised output layer. ``cond [R]``: the
    class label of each row (``forward`` then returns ``[K, R]``)."""

    def __init__(
        self, num_steps: int, kind: str = "per_step", hidden: int = 32, num_classes: int = 0
    ):
        super().__init__()
        if kind not in ("per_step", "mlp", "mlp_cond"):
            raise ValueError(f"F_psi kind must be 'per_step', 'mlp' or 'mlp_cond', got {kind!r}")
        if kind == "mlp_cond" and num_classes < 1:
            raise ValueError(
                "F_psi kind 'mlp_cond' needs the number of classes of a class-conditional base "
                f"(num_classes >= 1), got {num_classes}"
            )
        self.kind, self.num_steps, self.num_classes = kind, num_steps, num_classes
        if kind == "per_step":
            self.values = nn.Parameter(torch.zeros(num_steps))
            return
        width = 8 + (8 if kind == "mlp_cond" else 0)
        if kind == "mlp_cond":
            self.embedding = nn.Embedding(num_classes + 1, 8)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, step: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """``[K]`` for steps ``[K]``; ``[K, R]`` for ``kind="mlp_cond"`` with ``cond [R]``."""
        if self.kind == "per_step":
            if int(step.max()) >= self.num_steps:
                raise ValueError(
                    f"step {int(step.max())} is beyond F_psi's {self.num_steps} per-step values"
                )
            return self.values[step]
        freqs = torch.arange(1, 5, device=t.device, dtype=torch.float32) * math.pi
        angles = t.float().unsqueeze(-1) * freqs
        features = torch.cat([angles.sin(), angles.cos()], -1)  # [K, 8]
        if self.kind == "mlp":
            return self.mlp(features).squeeze(-1)
        labels = _class_ids(cond, self.num_classes, t.device)  # [R]
        emb = self.embedding(labels)  # [R, 8]
        K, R = features.shape[0], emb.shape[0]
        both = torch.cat([features[:, None].expand(K, R, 8), emb[None].expand(K, R, 8)], -1)
        return self.mlp(both).squeeze(-1)


def _class_ids(cond: Tensor | None, num_classes: int, device: Any) -> Tensor:
    """Row labels ``[R]`` of ``cond`` (``None``: one row of the unconditional index)."""
    if cond is None:
        return torch.full((1,), num_classes, dtype=torch.long, device=device)
    if not isinstance(cond, Tensor) or cond.is_floating_point() or cond.dim() != 1:
        raise TypeError(
            "F_psi kind 'mlp_cond' takes class labels, a LongTensor [R]; got "
            f"{type(cond).__name__}{tuple(cond.shape) if isinstance(cond, Tensor) else ''}"
        )
    if len(cond) and (int(cond.min()) < 0 or int(cond.max()) > num_classes):
        raise ValueError(
            f"F_psi: class labels must lie in [0, {num_classes}] ({num_classes} = null class), "
            f"got [{int(cond.min())}, {int(cond.max())}]"
        )
    return cond.to(device)


def transition_log_weights(
    path: SMCPath,
    base: Any,
    proposal: Any,
    mask_id: int,
    cond: Any = None,
    kl: bool = False,
    twist_change: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``log w [K, R]`` of the ``K`` transitions in ``path`` (float64; differentiable in the
    proposal's parameters, not in the base's), and the mean ``KL(q || p)`` over the masked
    positions of each transition ``[K, R]`` when ``kl``.

    ``base`` and ``proposal`` are denoisers; ``cond`` is per row ``[R, ...]`` (or ``None``).
    ``twist_change [K, R]``: ``log gamma_s(x_s) - log gamma_t(x_t)`` estimated otherwise (e.g.
    ``paired_twist_change``) instead of the twists the rollout recorded."""
    K, R, Lq = path.x_from.shape
    x_from = path.x_from.reshape(K * R, Lq)
    x_to = path.x_to.reshape(K * R, Lq)
    t = path.t.to(x_from.device).repeat_interleave(R)
    rows_cond = _repeat_cond(cond, K)
    with torch.no_grad():
        log_p = output_log_probs(base, base(x_from, t, rows_cond))
    log_q = output_log_probs(proposal, proposal(x_from, t, rows_cond))
    committed = (x_from == mask_id) & (x_to != mask_id)
    index = x_to.clamp_max(log_p.shape[-1] - 1).unsqueeze(-1)
    step_p = log_p.gather(-1, index).squeeze(-1).double()
    step_q = log_q.gather(-1, index).squeeze(-1).double()
    zero = torch.zeros((), dtype=torch.float64, device=x_from.device)
    log_ratio = torch.where(committed, step_p - step_q, zero).sum(-1)
    if twist_change is None:
        twist_change = path.twist_to - path.twist_from
    log_w = twist_change.to(log_ratio).reshape(-1) + log_ratio
    if not torch.isfinite(log_w).all():
        raise ValueError(
            "a transition has a non-finite log-weight: the proposal gives zero probability to a "
            "token the rollout committed (or the base does); check that rollouts came from this "
            "proposal at temperature 1 and top_p 1"
        )
    divergence = None
    if kl:
        masked = x_from == mask_id
        q = log_q.exp()
        terms = torch.where(q > 0, q * (log_q - log_p.clamp_min(-1e4)), torch.zeros_like(q))
        per_pos = terms.sum(-1)
        divergence = (per_pos * masked).sum(-1) / masked.sum(-1).clamp_min(1)
        divergence = divergence.reshape(K, R)
    return log_w.reshape(K, R), divergence


@torch.no_grad()
def paired_twist_change(
    path: SMCPath,
    base: Any,
    reward: Any,
    alpha: float,
    schedule: Any,
    num_steps: int,
    num_samples: int,
    generators: list[torch.Generator],
    mask_id: int,
    cond: Any = None,
) -> Tensor:
    """``log gamma_s(x_s) - log gamma_t(x_t) [K, R]`` of the reward tilt's twist
    ``log gamma = lambda(progress) r_hat / alpha``, ``r_hat = alpha log mean_m exp(r(x0_m) / alpha)``
    over ``num_samples`` draws ``x0_m ~ p_theta(x0 | x)`` (0: the most likely ``x0``, no noise),
    with **common random numbers**: the
    draws for ``x_t`` and for ``x_s`` use the same uniform per (sample, position) (inverse CDF),
    so ``x0`` differs between the two states mostly at the positions the transition committed.

    Coupling the two draws leaves the expectation of each twist unchanged, so the log-variance
    gradient (linear in the twist change) is unbiased as with independent draws; it removes most
    of the Monte-Carlo noise of ``r_hat`` from the change, the part a proposal cannot learn.
    ``generators``: one per row (``R``), for the uniforms. The last step's ``x_s`` is complete:
    its twist is the exact final ``r(x_s) / alpha``, as in the sampler. ``x_s`` is scored at the
    transition's time ``t`` (exact for denoisers without time conditioning, like MDLM's), except
    that with greedy x0 a state shared with the next recorded step is scored once, at its time.
    All states go through the base model and the reward in one batch each."""
    K, R, Lq = path.x_from.shape
    M = max(num_samples, 1)
    if len(generators) != R:
        raise ValueError(
            f"paired_twist_change needs one generator per row ({R}), got {len(generators)}"
        )
    device = path.x_from.device
    u = torch.stack([torch.rand(K, M, Lq, generator=g, dtype=torch.float64) for g in generators], 1)
    steps = path.step.tolist()
    lam_from = [float(schedule(k / num_steps)) for k in steps]
    lam_to = [1.0 if k + 1 >= num_steps else float(schedule((k + 1) / num_steps)) for k in steps]
    # every state once: x_to[k] is x_from[k + 1] when the path holds consecutive steps, and with
    # greedy x0 (no uniforms) its twist is then the same value
    states = [path.x_from[k] for k in range(K)]
    to_index = []
    for k in range(K):
        shared = (
            num_samples == 0
            and k + 1 < K
            and steps[k + 1] == steps[k] + 1
            and torch.equal(path.x_to[k], path.x_from[k + 1])
        )
        if shared:
            to_index.append(k + 1)
        else:
            to_index.append(len(states))
            states.append(path.x_to[k])
    x = torch.stack(states)  # [S, R, L]
    S = x.shape[0]
    # state k < K is x_from[k] at time t[k]; the others are x_to of step k, also at t[k]
    times = torch.stack([path.t[min(k, K - 1)] for k in range(S)]).to(device)
    extra = [k for k in range(K) if to_index[k] >= K]
    for n, k in enumerate(extra):
        times[K + n] = path.t[k]
    uniforms = None
    if num_samples:  # the uniforms of step k serve both of its states (common random numbers)
        owner = list(range(K)) + extra
        uniforms = u[torch.tensor(owner)].to(device).reshape(S * R, M, Lq)
    r_hat = _twist_values(
        x.reshape(S * R, Lq),
        times.repeat_interleave(R),
        base,
        reward,
        alpha,
        mask_id,
        uniforms,
        num_samples,
        _repeat_cond(cond, S),
    ).reshape(S, R)
    value_from = torch.tensor(lam_from, dtype=torch.float64, device=device)[:, None] * r_hat[:K]
    index = torch.tensor(to_index, device=device)
    value_to = torch.tensor(lam_to, dtype=torch.float64, device=device)[:, None] * r_hat[index]
    return (value_to - value_from) / alpha


def _twist_values(
    states: Tensor,
    times: Tensor,
    base: Any,
    reward: Any,
    alpha: float,
    mask_id: int,
    uniforms: Tensor | None,
    num_samples: int,
    cond: Any = None,
) -> Tensor:
    """``r_hat [S]`` of ``states [S, L]``: ``alpha log mean_m exp(r(x0_m) / alpha)`` over x0 draws
    from the base at ``times [S]`` (``uniforms [S, M, L]`` by inverse CDF), or ``r(argmax x0)``
    when ``num_samples`` is 0 (``uniforms`` unused). A complete state is its own x0."""
    S, Lq = states.shape
    M = max(num_samples, 1)
    probs = output_log_probs(base, base(states, times, cond)).exp().double()
    x0 = states.unsqueeze(1).repeat(1, M, 1)  # [S, M, L]
    where = (states == mask_id).unsqueeze(1).expand_as(x0)
    if where.any() and num_samples == 0:  # greedy: the most likely token
        x0[where] = probs.argmax(-1).unsqueeze(1).expand_as(x0)[where]
    elif where.any():
        rows = probs.unsqueeze(1).expand(-1, M, -1, -1)[where]
        x0[where] = inverse_cdf(rows, uniforms[where])
    r = reward(x0.reshape(S * M, Lq)).double().reshape(S, M).to(states.device)
    return alpha * (torch.logsumexp(r / alpha, -1) - math.log(M))


def sibling_log_weights(
    path: SMCPath,
    base: Any,
    proposal: Any,
    reward: Any,
    alpha: float,
    schedule: Any,
    num_steps: int,
    siblings: int,
    twist_samples: int,
    generators: list[torch.Generator],
    mask_id: int,
    cond: Any = None,
) -> tuple[Tensor, Tensor]:
    """``log w [K, R, siblings]`` of ``siblings`` draws of each recorded transition
    ``x_t -> x_s``: the same ``x_t`` and the same committed positions ``C`` (ancestral
    unmasking chooses them independently of the tokens, under ``p_theta`` and ``q_phi`` alike),
    the tokens at ``C`` drawn afresh from ``q_phi`` (sibling 0 is the recorded ``x_s``), each
    weighted by ``log gamma_s(x_s) - log gamma_t(x_t) + sum_C [log p_theta - log q_phi]``
    (differentiable in ``q_phi``), and the recorded transitions' ``log p - log q`` sums
    ``[K, R]`` (detached).

    Within one ``(x_t, C)`` the log-weights differ only by ``log q*(x_s | x_t, C) - log q_phi``
    with ``q*`` the locally optimal proposal given ``C``: their sample variance (the
    "per_state" baseline of ``AmortizedProposalModule``) is zero exactly when ``q_phi = q*``, and
    its gradient is, in expectation, that of ``KL(q_phi || q*)``; a baseline that does not depend
    on ``x_t`` (``F_psi(t)``, a batch mean) instead also rewards a ``q_phi`` that spoils its own
    match to offset how much ``E_p[gamma_s | x_t]`` varies between states.
    Twists as in ``paired_twist_change``: greedy x0 with ``twist_samples`` 0, else that many
    draws whose uniforms are shared by the siblings of a transition (common random numbers).
    ``generators``: one per row, for the siblings' tokens and the twists' uniforms."""
    K, R, Lq = path.x_from.shape
    J = siblings
    if J < 2:
        raise ValueError(f"siblings must be >= 2 (a per-state variance), got {J}")
    if len(generators) != R:
        raise ValueError(
            f"sibling_log_weights needs one generator per row ({R}), got {len(generators)}"
        )
    device = path.x_from.device
    N = K * R
    x_from = path.x_from.reshape(N, Lq)
    x_to = path.x_to.reshape(N, Lq)
    t = path.t.to(device).repeat_interleave(R)
    rows_cond = _repeat_cond(cond, K)
    with torch.no_grad():
        log_p = output_log_probs(base, base(x_from, t, rows_cond))
    log_q = output_log_probs(proposal, proposal(x_from, t, rows_cond))
    committed = (x_from == mask_id) & (x_to != mask_id)  # [N, L]
    # sibling tokens: one uniform per (sibling, position), row r from generators[r]
    M = max(twist_samples, 1)
    draws = torch.stack(
        [torch.rand(K, J, Lq + M * Lq, generator=g, dtype=torch.float64) for g in generators], 1
    ).to(device)  # [K, R, J, L + M L]
    u_tok = draws[..., :Lq].reshape(N, J, Lq)
    children = x_to.unsqueeze(1).repeat(1, J, 1)  # [N, J, L]
    fresh = committed.unsqueeze(1).expand_as(children).clone()
    fresh[:, 0] = False  # sibling 0: the recorded x_s
    if fresh.any():
        probs = log_q.detach().exp().unsqueeze(1).expand(-1, J, -1, -1)[fresh]
        children[fresh] = inverse_cdf(probs, u_tok[fresh])
    index = children.clamp_max(log_p.shape[-1] - 1)  # [N, J, L]
    step_p = log_p.unsqueeze(1).expand(-1, J, -1, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    step_q = log_q.unsqueeze(1).expand(-1, J, -1, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    where = committed.unsqueeze(1).expand_as(children)
    log_ratio = torch.where(where, step_p.double() - step_q.double(), zero).sum(-1)  # [N, J]
    # twists: x_t once, then the J children (at the transition's time, as paired_twist_change)
    steps = path.step.tolist()
    lam_from = torch.tensor([float(schedule(k / num_steps)) for k in steps], dtype=torch.float64)
    lam_to = torch.tensor(
        [1.0 if k + 1 >= num_steps else float(schedule((k + 1) / num_steps)) for k in steps],
        dtype=torch.float64,
    )
    uniforms = None
    if twist_samples:
        u_twist = draws[..., Lq:].reshape(N, 1, M, Lq)
        uniforms = u_twist.expand(-1, J + 1, -1, -1).reshape(N * (J + 1), M, Lq)
    states = torch.cat([x_from.unsqueeze(1), children], 1).reshape(N * (J + 1), Lq)
    with torch.no_grad():
        r_hat = _twist_values(
            states,
            t.repeat_interleave(J + 1),
            base,
            reward,
            alpha,
            mask_id,
            uniforms,
            twist_samples,
            _map_cond(rows_cond, lambda c: c.repeat_interleave(J + 1, dim=0)),
        ).reshape(K, R, J + 1)
    change = (
        lam_to.to(device)[:, None, None] * r_hat[..., 1:]
        - lam_from.to(device)[:, None, None] * r_hat[..., :1]
    ) / alpha
    log_w = change + log_ratio.reshape(K, R, J)
    if not torch.isfinite(log_w).all():
        raise ValueError(
            "a sibling transition has a non-finite log-weight: the base gives zero probability "
            "to a token the proposal drew"
        )
    return log_w, log_ratio.detach().reshape(K, R, J)[..., 0]


def log_variance_loss(log_w: Tensor, log_normalizer: Tensor) -> Tensor:
    """``mean((log w - F_psi(t))^2)`` with ``log_normalizer`` broadcast over rows ``[K, 1]``."""
    return ((log_w - log_normalizer.to(log_w.dtype)) ** 2).mean()


def _repeat_cond(cond: Any, times: int) -> Any:
    """Per-row ``cond`` (a tensor ``[R, ...]`` or a dict of them, e.g. a text-to-image model's
    prompt embeddings) for ``times`` stacked copies of the rows (``[times * R, ...]``)."""
    return _map_cond(cond, lambda c: c.repeat(times, *([1] * (c.dim() - 1))))


def _map_cond(cond: Any, fn: Any) -> Any:
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return fn(cond)
    if isinstance(cond, dict) and all(isinstance(v, Tensor) for v in cond.values()):
        return {k: fn(v) for k, v in cond.items()}
    raise TypeError(
        "AmortizedProposalModule supports cond=None, a per-row tensor or a dict of per-row "
        f"tensors, got {type(cond).__name__}"
    )
