"""Meissonic's transformer, native: Hub checkpoints load strictly, without remote code.

``MeissonicTransformer`` is the masked image-token network of Meissonic (``MeissonFlow/Meissonic``,
1024², and ``Collov-Labs/Monetico``, 512²), published as remote code (``Transformer2DModel``) that
no longer runs under diffusers 0.42. Its parameter names are the checkpoints' (867 keys at full
size), so a ``transformer/`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``,
sharded or not) loads with ``MeissonicTransformer.from_pretrained(folder)``; a missing, extra or
misshapen key is an error. Notation: ``B`` batch, ``H x W`` the token grid, ``S`` text tokens,
``D = num_attention_heads * attention_head_dim`` the width, ``K = codebook_size``.

Forward (``x [B, H, W]`` VQ ids, the mask id is ``vocab_size - 1``):

- ``c = cond_embed([pooled, sinusoid_256(micro_conds)])`` with ``micro_conds [B, 5]`` = (width,
  height, crop top, crop left, aesthetic score); ``temb = time_text_embed(1000 * timestep, c)``
  (so ``pooled_projection_dim`` must equal ``D``);
- image stream: ``embed`` (embedding, RMSNorm, 1x1 conv), ``down_block`` (RMSNorm + 2x2 stride-2
  conv when ``downsample``), RMSNorm + linear; text stream: ``context_embedder`` + RMSNorm;
- ``num_layers`` joint (MMDiT) blocks over ``[text; image]`` with per-stream AdaLN-Zero, QK
  RMSNorm and Flux RoPE (text positions 0, image positions ``(0, row, col)`` of the reduced grid,
  axes ``axes_dims_rope``), then ``num_single_layers`` single-stream blocks on the concatenation;
- the image part: RMSNorm + linear, ``up_block`` (transposed 2x2 conv), ``mlm_layer`` ->
  logits ``[B, K, H, W]`` over the codebook only.

``timestep`` is the reference's: training passes ``1000 * mask ratio``, the reference pipeline
the step index ``T - 1 .. 0``; the network multiplies it by 1000 again before the sinusoid.
``MeissonicDenoiser`` maps the sampler's ``t`` to one of these (``timestep="mask_fraction"`` or
``"step_index"``). ``MeissonicClassTransformer`` replaces the text encoder by class embeddings
(``num_classes + 1`` rows, the last one the null class for CFG)::

    net = MeissonicTransformer.from_pretrained("Monetico/transformer")
    denoiser = MeissonicDenoiser(net, grid_shape=(32, 32))
    logits = denoiser(x_t, t, cond)  # [B, 1024, vocab_size], -inf off the codebook
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import (
    CombinedTimestepTextProjEmbeddings,
    TimestepEmbedding,
    get_timestep_embedding,
)
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import RMSNorm
from torch import Tensor, nn

from .base import CodebookDenoiser
from .meissonic_blocks import (
    EPS,
    JointBlock,
    MlmHead,
    Resample,
    SingleBlock,
    TokenEmbed,
    rope_table,
)

__all__ = ["MeissonicClassTransformer", "MeissonicDenoiser", "MeissonicTransformer"]

#: micro-conditions per image (width, height, crop top, crop left, aesthetic score) and the
#: width of each one's sinusoidal embedding (aMUSEd's ``micro_cond_encode_dim``)
NUM_MICRO_CONDS, MICRO_COND_DIM = 5, 256


class MeissonicTransformer(ModelMixin, ConfigMixin):
    """Meissonic's ``Transformer2DModel`` (see the module docstring); defaults = Meissonic 1024².

    Args:
        patch_size, in_channels: kept for the checkpoints' ``config.json``; the architecture does
            not read them (tokens are never patched; the embedding width is ``D``).
        num_layers, num_single_layers: joint (MMDiT) and single-stream blocks.
        attention_head_dim, num_attention_heads: ``D = heads * head_dim``.
        joint_attention_dim: width of ``encoder_hidden_states`` (CLIP ``hidden_states[-2]``).
        pooled_projection_dim: width of ``pooled_projections`` (CLIP ``text_embeds``); must be ``D``.
        guidance_embeds: must be ``False`` (no released checkpoint embeds a guidance scale).
        axes_dims_rope: RoPE widths of the three position axes; they sum to ``attention_head_dim``.
        vocab_size: codebook plus extra ids; the last one (``vocab_size - 1``) is the mask.
        codebook_size: ``K``, the ids the network scores (``K < vocab_size``).
        downsample, upsample: the 2x2 conv around the stack (Meissonic: both; Monetico: neither).
    """

    _no_split_modules = ["JointBlock", "SingleBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        num_layers: int = 14,
        num_single_layers: int = 28,
        attention_head_dim: int = 128,
        num_attention_heads: int = 8,
        joint_attention_dim: int = 1024,
        pooled_projection_dim: int = 1024,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, ...] = (16, 56, 56),
        vocab_size: int = 8256,
        codebook_size: int = 8192,
        downsample: bool = True,
        upsample: bool = True,
    ):
        super().__init__()
        D = num_attention_heads * attention_head_dim
        _check_config(D, pooled_projection_dim, attention_head_dim, axes_dims_rope, guidance_embeds)
        _check_config_ids(vocab_size, codebook_size, downsample, upsample)
        self.inner_dim, self.mask_id = D, vocab_size - 1
        heads, head_dim = num_attention_heads, attention_head_dim
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(D, pooled_projection_dim)
        self.context_embedder = nn.Linear(joint_attention_dim, D)
        self.transformer_blocks = nn.ModuleList(
            JointBlock(D, heads, head_dim) for _ in range(num_layers)
        )
        self.single_transformer_blocks = nn.ModuleList(
            SingleBlock(D, heads, head_dim) for _ in range(num_single_layers)
        )
        self.embed = TokenEmbed(vocab_size, D)
        self.mlm_layer = MlmHead(D, codebook_size)
        micro = NUM_MICRO_CONDS * MICRO_COND_DIM
        self.cond_embed = TimestepEmbedding(
            micro + pooled_projection_dim, D, sample_proj_bias=False
        )
        self.encoder_proj_layer_norm = RMSNorm(D, EPS)
        self.project_to_hidden_norm = RMSNorm(D, EPS)
        self.project_to_hidden = nn.Linear(D, D, bias=False)
        self.project_from_hidden_norm = RMSNorm(D, EPS)
        self.project_from_hidden = nn.Linear(D, D, bias=False)
        self.down_block = Resample(D, down=downsample)
        self.up_block = Resample(D, up=upsample)

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        pooled_projections: Tensor,
        timestep: Tensor | float,
        micro_conds: Tensor,
    ) -> Tensor:
        """Codebook logits ``[B, K, H, W]`` of the token grid ``hidden_states [B, H, W]``.

        Args:
            hidden_states: VQ ids ``[B, H, W]`` in ``[0, vocab_size)`` (``H, W`` even when
                ``downsample``).
            encoder_hidden_states: ``[B, S, joint_attention_dim]``.
            pooled_projections: ``[B, pooled_projection_dim]``.
            timestep: a number, ``[1]`` or ``[B]``, the reference's convention (module docstring).
            micro_conds: ``[B, 5]`` (width, height, crop top, crop left, aesthetic score).
        """
        self._check_inputs(hidden_states, encoder_hidden_states, pooled_projections, micro_conds)
        B = hidden_states.shape[0]
        micro = get_timestep_embedding(
            micro_conds.flatten(), MICRO_COND_DIM, flip_sin_to_cos=True, downscale_freq_shift=0
        ).reshape(B, -1)
        c = self.cond_embed(torch.cat([pooled_projections, micro], dim=1).to(self.dtype))
        timestep = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1)
        if timestep.numel() not in (1, B):
            raise ValueError(
                f"timestep must be a number, [1] or [{B}], got {timestep.numel()} values"
            )
        temb = self.time_text_embed(timestep.to(self.dtype) * 1000, c)
        context = self.context_embedder(encoder_hidden_states.to(self.dtype))
        context = self.encoder_proj_layer_norm(context)
        h = self.down_block(self.embed(hidden_states))  # [B, D, h, w]
        _, _, height, width = h.shape
        h = self.project_to_hidden(self.project_to_hidden_norm(h.flatten(2).transpose(1, 2)))
        S = context.shape[1]
        rope = rope_table(self.config.axes_dims_rope, S, height, width, h.device)
        for block in self.transformer_blocks:
            h, context = block(h, context, temb, rope)
        h = torch.cat([context, h], dim=1)
        for block in self.single_transformer_blocks:
            h = block(h, temb, rope)
        h = self.project_from_hidden(self.project_from_hidden_norm(h[:, S:]))
        h = self.up_block(h.transpose(1, 2).unflatten(2, (height, width)))
        return self.mlm_layer(h)

    def _check_inputs(self, ids: Tensor, context: Tensor, pooled: Tensor, micro: Tensor) -> None:
        cfg = self.config
        if ids.dim() != 3 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(
                f"hidden_states must be integer ids [B, H, W], got {ids.dtype} {tuple(ids.shape)}"
            )
        lo, hi = (int(v) for v in torch.aminmax(ids)) if ids.numel() else (0, 0)
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, vocab_size={cfg.vocab_size}), got [{lo}, {hi}]"
            )
        if cfg.downsample and (ids.shape[1] % 2 or ids.shape[2] % 2):
            raise ValueError(
                f"downsample=True needs an even token grid, got {tuple(ids.shape[1:])}"
            )
        B = ids.shape[0]
        expected = {
            "encoder_hidden_states": (context, (B, None, cfg.joint_attention_dim)),
            "pooled_projections": (pooled, (B, cfg.pooled_projection_dim)),
            "micro_conds": (micro, (B, NUM_MICRO_CONDS)),
        }
        for name, (value, shape) in expected.items():
            if (
                not isinstance(value, Tensor)
                or value.dim() != len(shape)
                or any(n is not None and n != m for n, m in zip(shape, value.shape, strict=True))
            ):
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                want = "[" + ", ".join("S" if n is None else str(n) for n in shape) + "]"
                raise ValueError(f"{name} must be {want}, got {got}")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs: Any):
        """Load a ``transformer/`` folder (or hub id) strictly: every key present, none extra.

        Accepts diffusers' ``ModelMixin.from_pretrained`` keywords (``subfolder``,
        ``torch_dtype``, ``local_files_only``, ...); sharded checkpoints (an index json) work.
        A missing, unexpected or misshapen parameter raises ``ValueError`` naming it."""
        if kwargs.get("output_loading_info"):
            raise ValueError("output_loading_info is not supported: loading is strict")
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, output_loading_info=True, **kwargs
            )
        except (RuntimeError, ValueError) as err:  # diffusers' own refusals, e.g. a shape
            raise ValueError(
                f"{pretrained_model_name_or_path} is not a {cls.__name__} checkpoint: {err}"
            ) from err
        problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys")}
        problems["mismatched_keys"] = sorted(str(m) for m in info.get("mismatched_keys") or [])
        if any(problems.values()):
            raise ValueError(
                f"{pretrained_model_name_or_path} does not match {cls.__name__}"
                f"(num_layers={model.config.num_layers}, num_single_layers="
                f"{model.config.num_single_layers}): "
                + "; ".join(f"{k.replace('_', ' ')} {v}" for k, v in problems.items() if v)
                + " (expected the Hub names, e.g. 'transformer_blocks.0.attn.to_q.weight')"
            )
        return model


def _check_config(D: int, pooled_dim: int, head_dim: int, axes: tuple[int, ...], guidance: bool):
    if pooled_dim != D:
        raise ValueError(
            f"pooled_projection_dim={pooled_dim} must equal num_attention_heads * "
            f"attention_head_dim = {D}: cond_embed's output feeds time_text_embed's text projection"
        )
    if len(axes) != 3 or sum(axes) != head_dim or any(d % 2 for d in axes):
        raise ValueError(
            f"axes_dims_rope={list(axes)} must be three even widths summing to "
            f"attention_head_dim={head_dim}"
        )
    if guidance:
        raise ValueError("guidance_embeds=True is not supported (Meissonic trains without it)")


def _check_config_ids(vocab_size: int, codebook_size: int, down: bool, up: bool) -> None:
    if not 0 < codebook_size < vocab_size:
        raise ValueError(
            f"codebook_size={codebook_size} must be positive and below vocab_size={vocab_size} "
            "(the mask id vocab_size - 1 lies outside the codebook)"
        )
    if down != up:
        raise ValueError(f"downsample={down} and upsample={up} must agree (the grid must return)")


class MeissonicClassTransformer(MeissonicTransformer):
    """Class-conditional Meissonic: class embeddings stand in for the CLIP text encoder.

    Row ``y`` of ``class_embedding [num_classes + 1, pooled_projection_dim]`` is the pooled
    projection and row ``y`` of ``class_context [num_classes + 1, num_class_tokens *
    joint_attention_dim]`` the encoder sequence (``num_class_tokens`` tokens); label
    ``num_classes`` is the null class (CFG's unconditional branch). The blocks and their names
    are ``MeissonicTransformer``'s; the defaults make a CPU-sized model (about 0.57M parameters).

    Args:
        num_classes: real classes; labels lie in ``[0, num_classes]``.
        num_class_tokens: length ``S`` of the encoder sequence a label produces.
        others: as ``MeissonicTransformer``.
    """

    @register_to_config
    def __init__(
        self,
        num_classes: int = 10,
        num_class_tokens: int = 4,
        num_layers: int = 2,
        num_single_layers: int = 2,
        attention_head_dim: int = 16,
        num_attention_heads: int = 4,
        joint_attention_dim: int = 64,
        pooled_projection_dim: int = 64,
        axes_dims_rope: tuple[int, ...] = (4, 6, 6),
        vocab_size: int = 257,
        codebook_size: int = 256,
        downsample: bool = False,
        upsample: bool = False,
        patch_size: int = 1,
        in_channels: int = 64,
        guidance_embeds: bool = False,
    ):
        if num_classes < 1 or num_class_tokens < 1:
            raise ValueError(
                f"num_classes={num_classes} and num_class_tokens={num_class_tokens} must be >= 1"
            )
        super().__init__(
            patch_size=patch_size,
            in_channels=in_channels,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=axes_dims_rope,
            vocab_size=vocab_size,
            codebook_size=codebook_size,
            downsample=downsample,
            upsample=upsample,
        )
        self.null_class = num_classes
        self.class_embedding = nn.Embedding(num_classes + 1, pooled_projection_dim)
        self.class_context = nn.Embedding(num_classes + 1, num_class_tokens * joint_attention_dim)

    def forward(
        self,
        hidden_states: Tensor,
        class_labels: Tensor,
        timestep: Tensor | float,
        micro_conds: Tensor | None = None,
    ) -> Tensor:
        """Codebook logits ``[B, K, H, W]`` of ``hidden_states [B, H, W]`` given ``class_labels [B]``
        (``num_classes`` = null class); ``micro_conds [B, 5]`` default to zeros."""
        labels = torch.as_tensor(class_labels, device=hidden_states.device)
        B = hidden_states.shape[0]
        if labels.shape != (B,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"class_labels must be integers [{B}], got {labels.dtype} {tuple(labels.shape)}"
            )
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) <= self.null_class:
            raise ValueError(
                f"class_labels must lie in [0, {self.null_class}] ({self.null_class} = null class), "
                f"got [{int(labels.min())}, {int(labels.max())}]"
            )
        context = self.class_context(labels).unflatten(1, (self.config.num_class_tokens, -1))
        if micro_conds is None:
            micro_conds = hidden_states.new_zeros(B, NUM_MICRO_CONDS, dtype=self.dtype)
        return super().forward(
            hidden_states, context, self.class_embedding(labels), timestep, micro_conds
        )


class _GridNetwork(nn.Module):
    """``(x_t [B, H*W], t [B], cond) -> [B, H*W, K]``: reshapes, maps ``t``, unpacks ``cond``."""

    def __init__(self, transformer: MeissonicTransformer, grid_shape, timestep: str, num_steps):
        super().__init__()
        self.transformer, self.grid_shape = transformer, grid_shape
        self.timestep, self.num_steps = timestep, num_steps

    def timestep_of(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The reference's ``timestep [B]`` for the state ``x_t`` at the sampler's time ``t``."""
        if self.timestep == "mask_fraction":  # train_meissonic.py: 1000 * the masked share
            return 1000.0 * (x_t == self.transformer.mask_id).float().mean(-1)
        t = torch.as_tensor(t, dtype=torch.float64, device=x_t.device).reshape(-1)
        # the pipeline's scheduler counts T - 1 .. 0; the sampler's step i has t = 1 - i / T
        step = (t * self.num_steps).round() - 1
        return step.clamp_min(0).expand(x_t.shape[0]).float()

    def forward(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        B = x_t.shape[0]
        grid = x_t.long().view(B, *self.grid_shape)
        timestep = self.timestep_of(x_t, t)
        net = self.transformer
        if isinstance(net, MeissonicClassTransformer):
            labels = _class_labels(cond, B, net.null_class, x_t.device)
            logits = net(grid, labels, timestep, _get(cond, "micro_conds", optional=True))
        else:
            logits = net(
                grid,
                _get(cond, "encoder_hidden_states"),
                _get(cond, "pooled_projections"),
                timestep,
                _get(cond, "micro_conds"),
            )
        return logits.flatten(2).transpose(1, 2)  # [B, K, H, W] -> [B, H*W, K]


def _get(cond: Any, key: str, optional: bool = False) -> Tensor | None:
    if isinstance(cond, dict) and key in cond:
        return cond[key]
    if optional:
        return None
    raise ValueError(
        f"MeissonicDenoiser needs cond={{'encoder_hidden_states': [B, S, D_text], "
        f"'pooled_projections': [B, P], 'micro_conds': [B, 5]}}; '{key}' is missing "
        f"(got {type(cond).__name__}{' with keys ' + str(sorted(cond)) if isinstance(cond, dict) else ''})"
    )


def _class_labels(cond: Any, batch: int, null_class: int, device) -> Tensor:
    """``cond`` as labels ``[B]``: a tensor, ``{'class_labels': tensor}``, or ``None`` (null class)."""
    if cond is None:
        return torch.full((batch,), null_class, dtype=torch.long, device=device)
    if isinstance(cond, dict):
        if "class_labels" not in cond:
            raise ValueError(
                f"a class-conditional MeissonicDenoiser needs cond['class_labels'] [B] (null class "
                f"= {null_class}); got keys {sorted(cond)}"
            )
        cond = cond["class_labels"]
    if not isinstance(cond, Tensor):
        raise ValueError(f"class labels must be a LongTensor [B], got {type(cond).__name__}")
    return cond.reshape(-1) if cond.dim() == 2 and cond.shape[1] == 1 else cond


TIMESTEP_CONVENTIONS = ("mask_fraction", "step_index")


class MeissonicDenoiser(CodebookDenoiser):
    """``ls.Denoiser`` over flattened token grids ``x_t [B, H * W]`` (row-major) for the sampler.

    Returns ``[B, H * W, vocab_size]``: the transformer's codebook logits at ids ``0 .. K-1`` and
    ``-inf`` at every other id, the mask (``vocab_size - 1``) included.

    Args:
        transformer: a ``MeissonicTransformer`` (text) or ``MeissonicClassTransformer``.
        grid_shape: ``(H, W)`` of the token grid.
        timestep: how the sampler's ``t`` becomes the network's ``timestep``:
            ``"mask_fraction"`` (default, the convention of the reference's training script,
            ``1000 * mask ratio``): ``1000 * (masked share of the row)``, independent of ``t``;
            ``"step_index"`` (the reference pipeline, hence the one the Hub checkpoints are
            sampled with): ``round(num_steps * t) - 1``, i.e. ``T - 1 .. 0`` over the steps.
        num_steps: the sampler's ``num_steps``; required by ``"step_index"``.

    ``time_conditioning`` is ``True`` only for ``"step_index"``: with ``"mask_fraction"`` the
    logits depend on ``x_t`` alone, so the sampler's logit cache (``cache=True``) is allowed.

    ``cond`` (expanded per particle row by the sampler): for text, a dict of
    ``encoder_hidden_states [B, S, joint_attention_dim]``, ``pooled_projections [B, P]`` and
    ``micro_conds [B, 5]``; for classes, labels ``[B]`` (or ``{'class_labels': [B]}``, optionally
    with ``micro_conds``), label ``num_classes`` or ``cond=None`` being the null class.
    """

    #: default LoRA targets (``LoRADenoiser``): the attention projections of every block and the
    #: single-stream MLP (``proj_out`` also matches nothing else: the output head is a conv)
    lora_target_modules = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "proj_mlp",
        "proj_out",
    )

    def __init__(
        self,
        transformer: MeissonicTransformer,
        grid_shape: tuple[int, int],
        timestep: str = "mask_fraction",
        num_steps: int | None = None,
    ):
        if not isinstance(transformer, MeissonicTransformer):
            raise TypeError(
                f"transformer must be a MeissonicTransformer, got {type(transformer).__name__}"
            )
        if timestep not in TIMESTEP_CONVENTIONS:
            raise ValueError(f"timestep={timestep!r} is not one of {TIMESTEP_CONVENTIONS}")
        if timestep == "step_index" and (num_steps is None or num_steps < 1):
            raise ValueError("timestep='step_index' needs num_steps (the sampler's num_steps)")
        grid_shape = tuple(int(n) for n in grid_shape)
        if len(grid_shape) != 2:
            raise ValueError(f"grid_shape must be (H, W), got {grid_shape}")
        config = transformer.config
        super().__init__(
            _GridNetwork(transformer, grid_shape, timestep, num_steps),
            vocab_size=config.vocab_size,
            mask_id=config.vocab_size - 1,
            grid_shape=grid_shape,
        )
        self.time_conditioning = timestep == "step_index"

    @property
    def transformer(self) -> MeissonicTransformer:
        return self.network.transformer
