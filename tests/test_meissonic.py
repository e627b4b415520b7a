"""Native Meissonic transformer: Hub format, golden logits of the reference, the sampler wrapper.

Fixtures (``tests/goldens/meissonic/README.md``) come from the reference ``Transformer2DModel``
(viiika/Meissonic) run once under diffusers 0.32 at a tiny size with random weights.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lightning_smc as ls
from lightning_smc.models.meissonic import (
    MeissonicClassTransformer,
    MeissonicDenoiser,
    MeissonicTransformer,
)

GOLDENS = Path(__file__).parent / "goldens" / "meissonic"
FIXTURES = ["meissonic_tiny", "monetico_tiny"]  # with / without the 2x2 down-up convolution
WEIGHTS = "diffusion_pytorch_model.safetensors"


def golden(name):
    return load_file(str(GOLDENS / name / "golden.safetensors"))


def run(model, g):
    with torch.no_grad():
        return model(
            g["hidden_states"],
            g["encoder_hidden_states"],
            g["pooled_projections"],
            g["timestep"],
            g["micro_conds"],
        )


@pytest.mark.parametrize("name", FIXTURES)
def test_strict_load_reproduces_the_reference_logits(name):
    model = MeissonicTransformer.from_pretrained(GOLDENS / name / "transformer")
    stored = load_file(str(GOLDENS / name / "transformer" / WEIGHTS))
    assert set(model.state_dict()) == set(stored)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stored.items())
    g = golden(name)
    logits = run(model, g)
    assert logits.dtype == torch.float32 and logits.shape == g["logits"].shape
    assert logits.shape[1] == model.config.codebook_size  # logits over the codebook only
    torch.testing.assert_close(logits, g["logits"], atol=1e-5, rtol=0)
    assert g["logits"].std() > 0.1  # the fixture is not degenerate


def test_full_size_parameter_names_and_shapes_are_the_hub_checkpoints():
    reference = {}
    for line in (GOLDENS / "meissonic_1024_keys.txt").read_text().splitlines():
        key, shape = line.split()
        reference[key] = tuple(int(n) for n in shape.split(","))
    with torch.device("meta"):
        model = MeissonicTransformer()  # defaults: Meissonic 1024²
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(reference) == 867
    assert ours == reference


def test_sharded_checkpoint_round_trip(tmp_path):
    model = MeissonicTransformer.from_pretrained(GOLDENS / "meissonic_tiny" / "transformer")
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    index = json.loads((tmp_path / f"{WEIGHTS}.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (tmp_path / WEIGHTS).exists()
    assert set(index["weight_map"]) == set(model.state_dict())
    loaded = MeissonicTransformer.from_pretrained(tmp_path)
    g = golden("meissonic_tiny")
    torch.testing.assert_close(run(loaded, g), g["logits"], atol=1e-5, rtol=0)


def _edit(state, case):
    if case == "missing":
        state.pop("single_transformer_blocks.1.attn.norm_k.weight")
        return "single_transformer_blocks.1.attn.norm_k.weight"
    if case == "unexpected":
        state["transformer_blocks.0.attn.to_qkv.weight"] = torch.zeros(48, 16)
        return "transformer_blocks.0.attn.to_qkv.weight"
    state["context_embedder.weight"] = torch.zeros(16, 13)  # misshapen
    return "context_embedder.weight"


@pytest.mark.parametrize("case", ["missing", "unexpected", "misshapen"])
def test_a_wrong_checkpoint_is_a_named_error(tmp_path, case):
    source = GOLDENS / "meissonic_tiny" / "transformer"
    shutil.copy(source / "config.json", tmp_path / "config.json")
    state = load_file(str(source / WEIGHTS))
    key = _edit(state, case)
    save_file(state, str(tmp_path / WEIGHTS))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        MeissonicTransformer.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"pooled_projection_dim": 12}, "pooled_projection_dim=12 must equal"),
        ({"axes_dims_rope": (2, 2, 2)}, "axes_dims_rope"),
        ({"codebook_size": 40}, "codebook_size=40"),
        ({"downsample": True, "upsample": False}, "must agree"),
        ({"guidance_embeds": True}, "guidance_embeds"),
    ],
)
def test_inconsistent_config_names_the_field(fields, message):
    base = json.loads((GOLDENS / "meissonic_tiny" / "transformer" / "config.json").read_text())
    base = {k: v for k, v in base.items() if not k.startswith("_")}
    with pytest.raises(ValueError, match=message):
        MeissonicTransformer(**{**base, **fields})


def test_bad_inputs_are_named():
    model = MeissonicTransformer.from_pretrained(GOLDENS / "meissonic_tiny" / "transformer")
    g = golden("meissonic_tiny")
    with pytest.raises(ValueError, match="micro_conds must be"):
        run(model, {**g, "micro_conds": g["micro_conds"][:, :4]})
    with pytest.raises(ValueError, match="vocab_size=40"):
        run(model, {**g, "hidden_states": g["hidden_states"] + 40})
    with pytest.raises(ValueError, match="even token grid"):
        run(model, {**g, "hidden_states": g["hidden_states"][:, :3]})


# --------------------------------------------------------------------------- the sampler wrapper
def text_cond(g):
    return {k: g[k] for k in ("encoder_hidden_states", "pooled_projections", "micro_conds")}


def test_denoiser_is_the_transformer_on_flat_grids_with_no_mass_off_the_codebook():
    model = MeissonicTransformer.from_pretrained(GOLDENS / "meissonic_tiny" / "transformer")
    g = golden("meissonic_tiny")
    # step_index with 1000 steps hits the fixture's timesteps 250 and 875 exactly
    denoiser = MeissonicDenoiser(model, grid_shape=(4, 6), timestep="step_index", num_steps=1000)
    assert (denoiser.vocab_size, denoiser.mask_id) == (40, 39)
    x_t = g["hidden_states"].flatten(1)
    with torch.no_grad():
        logits = denoiser(x_t, torch.tensor([0.251, 0.876]), text_cond(g))
    assert logits.shape == (2, 24, 40)
    expected = g["logits"].permute(0, 2, 3, 1).reshape(2, 24, 32)  # row-major flattening
    torch.testing.assert_close(logits[..., :32], expected, atol=1e-5, rtol=0)
    assert torch.isneginf(logits[..., 32:]).all() and torch.isfinite(logits[..., :32]).all()
    probs = logits.softmax(-1)
    assert probs[..., 32:].sum() == 0 and probs[..., denoiser.mask_id].max() == 0
    with pytest.raises(ValueError, match="'pooled_projections' is missing"):
        denoiser(x_t, torch.ones(2), {"encoder_hidden_states": g["encoder_hidden_states"]})


def test_timestep_conventions():
    model = MeissonicClassTransformer(num_classes=3, vocab_size=9, codebook_size=8)
    x_t = torch.tensor([[8, 8, 8, 8], [0, 8, 1, 2]])  # mask id 8: 4 / 4 and 1 / 4 masked
    train = MeissonicDenoiser(model, (2, 2)).network.timestep_of(x_t, torch.ones(2))
    assert train.tolist() == [1000.0, 250.0]  # train_meissonic.py: 1000 * mask ratio
    pipe = MeissonicDenoiser(model, (2, 2), timestep="step_index", num_steps=4).network
    # the sampler's step i of T has t = 1 - i / T; the reference scheduler counts T - 1 .. 0
    assert [float(pipe.timestep_of(x_t[:1], torch.tensor(1 - i / 4))) for i in range(4)] == [
        3.0,
        2.0,
        1.0,
        0.0,
    ]
    with pytest.raises(ValueError, match="needs num_steps"):
        MeissonicDenoiser(model, (2, 2), timestep="step_index")
    # logits that depend on t may not be cached across steps; mask_fraction ones may
    ls.SMCSampler(MeissonicDenoiser(model, (2, 2)), cache=True)
    with pytest.raises(ValueError, match="time conditioning"):
        ls.SMCSampler(
            MeissonicDenoiser(model, (2, 2), timestep="step_index", num_steps=4), cache=True
        )


def test_lora_adapter_on_the_default_targets_starts_at_the_base_model():
    torch.manual_seed(0)
    model = MeissonicClassTransformer(num_classes=3, vocab_size=9, codebook_size=8).eval()
    denoiser = MeissonicDenoiser(model, (4, 4))
    x_t, t, labels = torch.randint(0, 9, (2, 16)), torch.ones(2), torch.tensor([0, 3])
    with torch.no_grad():
        before = denoiser(x_t, t, labels)
    lora = ls.LoRADenoiser(denoiser, rank=2)
    adapted = {n.split(".lora_A.")[0] for n, _ in lora.peft.named_parameters() if ".lora_A." in n}
    for target in MeissonicDenoiser.lora_target_modules:  # every default target is adapted
        assert any(name.endswith("." + target) for name in adapted), target
    assert len(lora.adapter_parameters()) > 0
    with torch.no_grad():
        torch.testing.assert_close(lora(x_t, t, labels), before)  # zero-initialised B


def test_class_conditional_variant_null_class_and_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MeissonicClassTransformer(num_classes=3, vocab_size=9, codebook_size=8).eval()
    assert sum(p.numel() for p in model.parameters()) < 1_000_000  # CPU-sized
    x = torch.randint(0, 9, (4, 4, 4))
    with torch.no_grad():
        logits = model(x, torch.tensor([0, 1, 2, 3]), torch.full((4,), 500.0))
        null = model(x, torch.full((4,), 3), torch.full((4,), 500.0))
    assert logits.shape == (4, 8, 4, 4) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits[3], null[3])  # label 3 is the null class
    assert not torch.allclose(logits[0], null[0])  # the label matters
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 3\]"):
        model(x, torch.tensor([0, 1, 2, 4]), 1.0)
    model.save_pretrained(tmp_path)
    loaded = MeissonicClassTransformer.from_pretrained(tmp_path)
    assert (loaded.config.num_classes, loaded.config.num_class_tokens) == (3, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, torch.tensor([0, 1, 2, 3]), 500.0), logits)
    denoiser = MeissonicDenoiser(model, (4, 4))
    with torch.no_grad():  # cond=None is the null class
        torch.testing.assert_close(
            denoiser(x.flatten(1), torch.ones(4), None),
            denoiser(x.flatten(1), torch.ones(4), torch.full((4,), 3)),
        )


def test_shared_sampler_expands_cond_per_row_and_draws_only_codebook_ids():
    torch.manual_seed(0)
    model = MeissonicClassTransformer(num_classes=3, vocab_size=9, codebook_size=8).eval()
    seen = []
    forward = model.forward
    model.forward = lambda x, labels, *a, **k: (
        seen.append(labels.clone()) or forward(x, labels, *a, **k)
    )
    denoiser = MeissonicDenoiser(model, grid_shape=(4, 4))
    sampler = ls.SMCSampler(denoiser, num_particles=2, num_steps=4, unmasking="low_confidence")
    out = sampler.sample(
        16, batch_size=2, cond=torch.tensor([2, 0]), generator=torch.Generator().manual_seed(0)
    )
    assert out.tokens.shape == (2, 2, 16)
    assert out.tokens.min() >= 0 and out.tokens.max() < 8  # codebook ids only, never the mask
    assert len(seen) == 4 and all(s.tolist() == [2, 2, 0, 0] for s in seen)


def test_shared_sampler_expands_a_text_cond_dict_per_row():
    model = MeissonicTransformer.from_pretrained(GOLDENS / "monetico_tiny" / "transformer")
    g = golden("monetico_tiny")
    seen = []
    forward = model.forward
    model.forward = lambda x, enc, pooled, *a: (
        seen.append((enc, pooled)) or forward(x, enc, pooled, *a)
    )
    denoiser = MeissonicDenoiser(model, grid_shape=(3, 5))
    out = ls.SMCSampler(denoiser, num_particles=2, num_steps=3, unmasking="random").sample(
        15, batch_size=2, cond=text_cond(g), generator=torch.Generator().manual_seed(1)
    )
    assert out.tokens.shape == (2, 2, 15) and out.tokens.max() < model.config.codebook_size
    rows = torch.tensor([0, 0, 1, 1])  # particle row -> prompt
    assert len(seen) == 3
    for enc, pooled in seen:
        assert torch.equal(enc, g["encoder_hidden_states"][rows])
        assert torch.equal(pooled, g["pooled_projections"][rows])
