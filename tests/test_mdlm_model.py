"""``MDLMDenoiser``: mdlm-owt checkpoint format, SUBS output, errors, and use in the sampler.

The expected state-dict keys and ``config.json`` fields below are written out by hand from
``kuleshov-group/mdlm-owt`` (``modeling_mdlm.py``: ``MDLM.backbone = DITBackbone``;
``config.json``), independently of the module, so a renamed attribute fails here.
"""

from __future__ import annotations

import json
import math

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import lightning_smc as ls
from lightning_smc.models.mdlm import MDLMConfig, MDLMDenoiser

V, H, C, NB, NH, LMAX = 50, 32, 16, 2, 2, 16
TINY = dict(vocab_size=V, model_length=LMAX, hidden_dim=H, cond_dim=C, n_blocks=NB, n_heads=NH)

BLOCK_PARAMS = {  # name -> shape, from DDiTBlock
    "norm1.weight": (H,),
    "attn_qkv.weight": (3 * H, H),
    "attn_out.weight": (H, H),
    "norm2.weight": (H,),
    "mlp.0.weight": (4 * H, H),
    "mlp.0.bias": (4 * H,),
    "mlp.2.weight": (H, 4 * H),
    "mlp.2.bias": (H,),
    "adaLN_modulation.weight": (6 * H, C),
    "adaLN_modulation.bias": (6 * H,),
}


def owt_shapes(n_blocks: int = NB) -> dict[str, tuple[int, ...]]:
    """mdlm-owt's ``model.safetensors`` keys and shapes for the tiny sizes above."""
    shapes = {
        "backbone.vocab_embed.embedding": (V, H),
        "backbone.sigma_map.mlp.0.weight": (C, 256),
        "backbone.sigma_map.mlp.0.bias": (C,),
        "backbone.sigma_map.mlp.2.weight": (C, C),
        "backbone.sigma_map.mlp.2.bias": (C,),
        "backbone.rotary_emb.inv_freq": (H // NH // 2,),
        "backbone.output_layer.norm_final.weight": (H,),
        "backbone.output_layer.linear.weight": (V, H),
        "backbone.output_layer.linear.bias": (V,),
        "backbone.output_layer.adaLN_modulation.weight": (2 * H, C),
        "backbone.output_layer.adaLN_modulation.bias": (2 * H,),
    }
    for i in range(n_blocks):
        shapes.update({f"backbone.blocks.{i}.{k}": s for k, s in BLOCK_PARAMS.items()})
    return shapes


def write_owt_checkpoint(directory, seed: int = 0, extra: dict | None = None):
    """A checkpoint folder as the hub's ``save_pretrained`` wrote it, with random weights."""
    g = torch.Generator().manual_seed(seed)
    state = {k: 0.3 * torch.randn(s, generator=g) for k, s in owt_shapes().items()}
    hd = H // NH
    state["backbone.rotary_emb.inv_freq"] = 1.0 / 10_000 ** (torch.arange(0, hd, 2).float() / hd)
    state.update(extra or {})
    config = {
        "_name_or_path": "kuleshov-group/mdlm-owt",
        "architectures": ["MDLM"],
        "auto_map": {
            "AutoConfig": "configuration_mdlm.MDLMConfig",
            "AutoModelForMaskedLM": "modeling_mdlm.MDLM",
        },
        "cond_dim": C,
        "dropout": 0.1,
        "hidden_dim": H,
        "model_length": LMAX,
        "model_type": "mdlm",
        "n_blocks": NB,
        "n_heads": NH,
        "return_dict": False,
        "time_conditioning": False,
        "torch_dtype": "float32",
        "transformers_version": "4.38.2",
        "vocab_size": V,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    safetensors.torch.save_file(state, str(directory / "model.safetensors"))
    return state


def reference_logits(state: dict, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """MDLM's DiT forward written out from the hub code, as plain functions of the state dict."""
    p = {k.removeprefix("backbone."): v for k, v in state.items()}
    half = 128
    freqs = torch.exp(-math.log(10_000) * torch.arange(half) / half)
    emb = torch.cat([torch.cos(sigma[:, None] * freqs), torch.sin(sigma[:, None] * freqs)], -1)
    c = F.linear(F.silu(F.linear(emb, p["sigma_map.mlp.0.weight"], p["sigma_map.mlp.0.bias"])),
                 p["sigma_map.mlp.2.weight"], p["sigma_map.mlp.2.bias"])  # fmt: skip
    c = F.silu(c)
    h = p["vocab_embed.embedding"][x]
    B, L = x.shape
    ang = torch.arange(L).float()[:, None] * p["rotary_emb.inv_freq"][None]  # [L, hd/2]
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]

    def rope(u):  # flash-attn apply_rotary_emb, non-interleaved
        u1, u2 = u[..., : u.shape[-1] // 2], u[..., u.shape[-1] // 2 :]
        return torch.cat([u1 * cos - u2 * sin, u1 * sin + u2 * cos], -1)

    def ln(u, w):
        return F.layer_norm(u, (H,)) * w

    for i in range(NB):
        b = {k: p[f"blocks.{i}.{k}"] for k in BLOCK_PARAMS}
        mods = F.linear(c, b["adaLN_modulation.weight"], b["adaLN_modulation.bias"])[:, None]
        sh1, sc1, g1, sh2, sc2, g2 = mods.chunk(6, dim=2)
        qkv = F.linear(ln(h, b["norm1.weight"]) * (1 + sc1) + sh1, b["attn_qkv.weight"])
        q, k, v = qkv.view(B, L, 3, NH, H // NH).unbind(2)
        q, k = rope(q), rope(k)
        att = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(H // NH), -1)
        o = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, L, H)
        h = h + g1 * F.linear(o, b["attn_out.weight"])
        m = F.linear(ln(h, b["norm2.weight"]) * (1 + sc2) + sh2, b["mlp.0.weight"], b["mlp.0.bias"])
        h = h + g2 * F.linear(F.gelu(m, approximate="tanh"), b["mlp.2.weight"], b["mlp.2.bias"])
    o = {k: p[f"output_layer.{k}"] for k in ("adaLN_modulation.weight", "adaLN_modulation.bias")}
    shift, scale = F.linear(c, o["adaLN_modulation.weight"], o["adaLN_modulation.bias"])[
        :, None
    ].chunk(2, 2)
    h = ln(h, p["output_layer.norm_final.weight"]) * (1 + scale) + shift
    return F.linear(h, p["output_layer.linear.weight"], p["output_layer.linear.bias"])


def random_model(seed: int = 0, **fields) -> MDLMDenoiser:
    """A tiny model with every parameter randomized (the zero-initialised layers included)."""
    torch.manual_seed(seed)
    model = MDLMDenoiser(**{**TINY, **fields}).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(0.3 * torch.randn_like(param) + (1.0 if "norm" in name else 0.0))
    return model


def noisy_tokens(B: int = 3, L: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V - 1, (B, L), generator=g)
    return x.masked_fill(torch.rand(B, L, generator=g) < 0.5, V - 1)


def test_state_dict_keys_and_shapes_are_mdlm_owt():
    model = MDLMDenoiser(**TINY)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == owt_shapes()
    assert model.mask_id == V - 1 and model.vocab_size == V
    assert isinstance(model, ls.Denoiser)


def test_loads_hub_format_checkpoint_and_matches_reference_forward(tmp_path):
    state = write_owt_checkpoint(tmp_path / "owt")
    model = MDLMDenoiser.from_pretrained(tmp_path / "owt")
    assert not model.training and model.config == MDLMConfig(**TINY)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = noisy_tokens()
    with torch.no_grad():
        ref = reference_logits(state, x, torch.zeros(3))  # mdlm-owt: sigma = 0 for every t
        ref[..., V - 1] = -torch.inf
        ref = torch.log_softmax(ref, -1)
        got = model(x, torch.rand(3))
    masked = x == V - 1
    torch.testing.assert_close(got[masked], ref[masked], atol=1e-4, rtol=1e-4)


def test_save_load_roundtrip_is_exact_and_writes_owt_config(tmp_path):
    model = random_model(time_conditioning=True, mask_id=0)
    model.save_pretrained(tmp_path / "ckpt")
    written = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert written["model_type"] == "mdlm" and written["architectures"] == ["MDLM"]
    assert written["mask_id"] == 0 and written["hidden_dim"] == H and written["cond_dim"] == C
    loaded = MDLMDenoiser.from_pretrained(tmp_path / "ckpt")
    x, t = noisy_tokens().clamp_min(1), torch.tensor([0.1, 0.5, 0.9])
    x[:, ::2] = 0  # mask_id = 0 here
    with torch.no_grad():
        assert torch.equal(model(x, t), loaded(x, t))
    default = MDLMDenoiser(**TINY).save_pretrained(tmp_path / "default")
    hub_fields = {"architectures", "model_type", "return_dict", "torch_dtype", "vocab_size",
                  "model_length", "hidden_dim", "cond_dim", "n_blocks", "n_heads", "dropout",
                  "time_conditioning"}  # fmt: skip
    assert set(json.loads((default / "config.json").read_text())) == hub_fields


def test_pytorch_model_bin_and_overrides(tmp_path):
    state = write_owt_checkpoint(tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    model = MDLMDenoiser.from_pretrained(tmp_path / "bin", dropout=0.0, time_conditioning=True)
    assert model.config.dropout == 0.0 and model.config.time_conditioning
    with pytest.raises(ValueError, match="unknown MDLMConfig field"):
        MDLMDenoiser.from_pretrained(tmp_path / "bin", hidden_size=8)


def test_subs_output():
    model, x = random_model(), noisy_tokens()
    with torch.no_grad():
        log_p = model(x, torch.full((3,), 0.7))
    masked = x == V - 1
    assert torch.isneginf(log_p[..., V - 1]).all()
    rows = log_p[masked]
    assert torch.isfinite(rows[:, : V - 1]).all()
    torch.testing.assert_close(rows.logsumexp(-1), torch.zeros(len(rows)), atol=1e-5, rtol=0)
    clean = log_p[~masked]
    expected = torch.full_like(clean, -torch.inf).scatter(-1, x[~masked][:, None], 0.0)
    assert torch.equal(clean, expected)


def test_time_conditioning_switch():
    x = noisy_tokens()
    with torch.no_grad():
        off = random_model()
        assert torch.equal(off(x, torch.full((3,), 0.1)), off(x, torch.full((3,), 0.9)))
        on = random_model(time_conditioning=True)
        assert not torch.allclose(on(x, torch.full((3,), 0.1)), on(x, torch.full((3,), 0.9)))
        assert torch.equal(on(x, torch.tensor(0.5)), on(x, torch.full((3,), 0.5)))


@pytest.mark.parametrize(
    ("x", "t", "cond", "match"),
    [
        (torch.zeros(2, LMAX + 1, dtype=torch.long), torch.zeros(2), None, "model_length"),
        (torch.full((2, 4), V), torch.zeros(2), None, "token ids"),
        (torch.full((2, 4), -1), torch.zeros(2), None, "token ids"),
        (torch.zeros(2, 4), torch.zeros(2), None, "integer token ids"),
        (torch.zeros(4, dtype=torch.long), torch.zeros(1), None, "integer token ids"),
        (torch.zeros(2, 4, dtype=torch.long), torch.zeros(3), None, "t must be"),
        (torch.zeros(2, 4, dtype=torch.long), torch.zeros(2), torch.zeros(2), "unconditional"),
    ],
)
def test_bad_inputs_raise(x, t, cond, match):
    with pytest.raises(ValueError, match=match):
        MDLMDenoiser(**TINY)(x, t, cond)


def test_bad_checkpoints_raise(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        MDLMDenoiser.from_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        MDLMDenoiser.from_pretrained(tmp_path / "does" / "not" / "exist")
    write_owt_checkpoint(tmp_path / "noweights")
    (tmp_path / "noweights" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        MDLMDenoiser.from_pretrained(tmp_path / "noweights")
    write_owt_checkpoint(
        tmp_path / "extra", extra={"backbone.blocks.0.attn_qkv.bias": torch.zeros(3 * H)}
    )
    with pytest.raises(ValueError, match=r"unexpected keys \['backbone.blocks.0.attn_qkv.bias'\]"):
        MDLMDenoiser.from_pretrained(tmp_path / "extra")
    with pytest.raises(ValueError, match=r"missing keys \['backbone.blocks.2"):
        MDLMDenoiser.from_pretrained(tmp_path / "extra", n_blocks=3)
    write_owt_checkpoint(tmp_path / "good")
    with pytest.raises(ValueError, match="size mismatch"):
        MDLMDenoiser.from_pretrained(tmp_path / "good", cond_dim=8)
    config = json.loads((tmp_path / "extra" / "config.json").read_text())
    (tmp_path / "extra" / "config.json").write_text(json.dumps({**config, "model_type": "bd3lm"}))
    with pytest.raises(ValueError, match="model_type"):
        MDLMDenoiser.from_pretrained(tmp_path / "extra")


def test_hub_id_downloads_only_data_files(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    random_model().save_pretrained(tmp_path / "snap")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    MDLMDenoiser.from_pretrained("kuleshov-group/mdlm-owt")
    assert calls[0][0] == "kuleshov-group/mdlm-owt"
    assert not any(p.endswith(".py") or "*" in p for p in calls[0][1])

    def offline(repo_id, allow_patterns):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="reachable hub repo"):
        MDLMDenoiser.from_pretrained("nobody/nothing")


def test_bf16_autocast_and_gradients():
    model, x = random_model(), noisy_tokens()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        log_p = model(x, torch.full((3,), 0.5))
    masked = x == V - 1
    assert log_p.dtype == torch.float32 and torch.isfinite(log_p[masked][:, : V - 1]).all()
    torch.testing.assert_close(log_p[masked].logsumexp(-1), torch.zeros(int(masked.sum())))
    with torch.no_grad():
        fp32 = model(x, torch.full((3,), 0.5))
    assert (log_p[masked].exp() - fp32[masked].exp()).abs().max() < 0.05  # bf16 rounding only
    model.train()
    picked = model(x, torch.full((3,), 0.5)).gather(-1, torch.zeros_like(x)[..., None])
    picked[masked].sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_drives_the_smc_sampler():
    model = MDLMDenoiser(**{**TINY, "model_length": 8})
    out = ls.SMCSampler(model, num_particles=2, num_steps=4).sample(
        8, batch_size=2, generator=torch.Generator().manual_seed(0)
    )
    assert out.tokens.shape == (2, 2, 8)
    assert ((out.tokens >= 0) & (out.tokens < V - 1)).all()


class _Undeclared:
    """The same MDLM without ``outputs_log_probs``: the sampler renormalizes its outputs."""

    def __init__(self, model):
        self.model, self.vocab_size, self.mask_id = model, model.vocab_size, model.mask_id

    def __call__(self, x_t, t, cond=None):
        return self.model(x_t, t, cond)


@pytest.mark.parametrize("unmasking", ["ancestral", "low_confidence"])
def test_log_prob_outputs_are_used_as_they_are(unmasking):
    """MDLM declares normalized outputs: the sampler skips its log_softmax (one [R, L, V] pass per
    step) and samples exactly what renormalizing would, with weights equal up to float32
    rounding of the normalizer (which is 0 up to a few ulps)."""
    from lightning_smc.models.lora import LoRADenoiser
    from lightning_smc.sampling.context import denoiser_log_probs, outputs_log_probs

    torch.manual_seed(0)
    model = MDLMDenoiser(**{**TINY, "model_length": 12}).eval()
    lora = LoRADenoiser(MDLMDenoiser(**{**TINY, "model_length": 12}), rank=2)
    assert outputs_log_probs(model) and outputs_log_probs(lora)
    assert outputs_log_probs(lora.base_denoiser)
    x = torch.full((3, 12), model.mask_id)
    x[:, :4] = torch.arange(4)
    with torch.no_grad():
        log_p = model(x, torch.full((3,), 0.5))
    assert denoiser_log_probs(log_p, model.mask_id, is_log_probs=True) is log_p
    renormalized = denoiser_log_probs(log_p, model.mask_id)
    assert renormalized is not log_p
    torch.testing.assert_close(renormalized, log_p, rtol=0, atol=1e-5)
    kwargs = dict(num_particles=4, num_steps=6, unmasking=unmasking, potential=ls.SelfReward())
    runs = [
        ls.SMCSampler(d, **kwargs).sample(
            12, batch_size=2, generator=torch.Generator().manual_seed(3)
        )
        for d in (model, _Undeclared(model))
    ]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    torch.testing.assert_close(runs[0].log_weights, runs[1].log_weights, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runs[0].log_normalizer, runs[1].log_normalizer, rtol=1e-5, atol=1e-5)


def test_declared_log_probs_with_a_live_mask_column_are_renormalized():
    from lightning_smc.sampling.context import denoiser_log_probs

    logits = torch.randn(2, 3, 6)
    out = denoiser_log_probs(logits, mask_id=5, is_log_probs=True)
    assert torch.isneginf(out[..., 5]).all()
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, 3))
