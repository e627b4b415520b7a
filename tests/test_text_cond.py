"""Text conditioning at scale, at tiny size: a random CLIP text encoder, a hand-made CLIP BPE
tokenizer and a random Meissonic text transformer saved in the Hub layout, loaded without remote
code; prompts -> cond -> SMC with CFG (the empty prompt as the second condition)."""

import json
import string

import pytest
import torch
from tolerance import rounding_tolerance
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

import lightning_smc as ls
from lightning_smc.methods import ProductTargetSpec
from lightning_smc.models.meissonic import MeissonicTransformer
from lightning_smc.models.text_cond import (
    MeissonicTextDenoiser,
    TextConditioner,
    load_text_image_model,
)
from lightning_smc.models.vq import TINY_FMNIST_CONFIG, VQTokenizer

CODES, MAX_TOKENS, TEXT_DIM, WIDTH = 32, 12, 24, 16


def tiny_tokenizer(folder) -> CLIPTokenizer:
    """A CLIP BPE over lowercase letters: each letter alone and as a word end, a few merges."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    tokens += list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    tokens += ["".join(m) for m in merges]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
    tok = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS
    )
    tok.save_pretrained(folder)
    return tok


def tiny_pipeline(root):
    """A pipeline folder in the Hub layout; returns its (text encoder, transformer, vq)."""
    tokenizer = tiny_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=WIDTH,
        eos_token_id=eos,
        pad_token_id=eos,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
    )
    encoder = CLIPTextModelWithProjection(config).eval()
    encoder.save_pretrained(root / "text_encoder")
    transformer = MeissonicTransformer(
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=WIDTH,
        axes_dims_rope=(2, 2, 4),
        vocab_size=CODES + 1,
        codebook_size=CODES,
        downsample=False,
        upsample=False,
    ).eval()
    transformer.save_pretrained(root / "transformer")
    vq_config = {
        **TINY_FMNIST_CONFIG,
        "block_out_channels": [8, 16, 16],
        "latent_channels": 4,
        "num_vq_embeddings": CODES,
        "norm_num_groups": 4,
    }
    vq = VQTokenizer(vq_config, image_size=28)
    vq.vq.save_pretrained(root / "vqvae")  # a bare VQModel folder, as on the Hub
    return encoder, transformer, vq


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("monetico_tiny")
    parts = tiny_pipeline(root)
    model = load_text_image_model(root, resolution=28, local_files_only=True)
    return root, parts, model


def test_prompts_become_the_cond_the_transformer_reads(pipeline):
    _, (encoder, _, _), model = pipeline
    cond = model.cond(["a cat", "dog", ""], width=28, height=28)
    assert set(cond) == {"encoder_hidden_states", "pooled_projections", "micro_conds"}
    assert cond["encoder_hidden_states"].shape == (3, MAX_TOKENS, TEXT_DIM)
    assert cond["pooled_projections"].shape == (3, WIDTH)
    assert cond["micro_conds"].tolist() == [[28.0, 28.0, 0.0, 0.0, 6.0]] * 3
    ids = model.text.tokenizer(["a cat"], padding="max_length", max_length=MAX_TOKENS).input_ids
    out = encoder(torch.tensor(ids), output_hidden_states=True)
    assert torch.allclose(cond["encoder_hidden_states"][0], out.hidden_states[-2][0])
    assert torch.allclose(cond["pooled_projections"][0], out.text_embeds[0])
    assert not torch.allclose(cond["pooled_projections"][0], cond["pooled_projections"][1])
    null = model.text.null_cond()
    for key, value in null.items():
        assert torch.allclose(value[0], cond[key][2], atol=1e-5), key  # "" is the null condition


def test_cond_none_is_the_empty_prompt(pipeline):
    _, _, model = pipeline
    x = torch.full((2, model.seq_len), model.denoiser.mask_id)
    x[:, :5] = 3
    t = torch.ones(2)
    plain = model.denoiser(x, t)
    # cond=None is the stored empty-prompt condition, row for row (the same computation)
    assert torch.equal(plain, model.denoiser(x, t, model.denoiser.null(2)))
    stored = {k: getattr(model.denoiser, f"null_{k}") for k in model.cond([""])}
    assert all(torch.equal(v, model.cond([""])[k]) for k, v in stored.items())
    # ... and a batch of empty prompts gives it up to rounding: another batch shape / layout may
    # pick other kernels (a few ulps per term the condition passes through: 12 tokens x 24 dims)
    empty = model.denoiser(x, t, model.cond(["", ""]))
    finite = torch.isfinite(plain)
    assert torch.equal(finite, torch.isfinite(empty))
    tol = rounding_tolerance(
        num_terms=MAX_TOKENS * TEXT_DIM, magnitude=float(plain[finite].abs().max()), ulps=4
    )
    assert torch.allclose(plain[finite], empty[finite], rtol=0, atol=tol)
    assert not torch.equal(model.denoiser(x, t), model.denoiser(x, t, model.cond(["cat", "dog"])))


def test_hub_layout_loads_strictly_and_bad_folders_are_named(pipeline, tmp_path):
    root, (_, transformer, _), model = pipeline
    loaded = model.transformer.state_dict()
    assert list(loaded) == list(transformer.state_dict())
    assert all(torch.equal(v, loaded[k]) for k, v in transformer.state_dict().items())
    assert model.grid_shape == (7, 7) and model.vq.codebook_size == CODES
    assert isinstance(model.denoiser, MeissonicTextDenoiser)
    (tmp_path / "half" / "transformer").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"lacks \['vqvae', 'text_encoder', 'tokenizer'\]"):
        load_text_image_model(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        load_text_image_model("no-such-owner-xyz/no-such-model", local_files_only=True)


def test_local_files_only_is_passed_through(monkeypatch, pipeline):
    root, _, _ = pipeline
    seen = []
    real = CLIPTextModelWithProjection.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("local_files_only"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(CLIPTextModelWithProjection, "from_pretrained", classmethod(spy))
    TextConditioner.from_pretrained(root, resolution=28, local_files_only=True)
    assert seen == [True]


def test_prompts_to_cfg_smc_with_the_empty_prompt_as_second_condition(pipeline):
    _, _, model = pipeline
    cond = model.cond(["a cat", "dog"])
    spec = ProductTargetSpec(weight=1.5)  # second_cond None: the denoiser's null (empty prompt)
    late = dict(denoiser=model.denoiser, reward=None, guide=None, amortized=None)

    def run(potential):
        sampler = ls.SMCSampler(
            model.denoiser,
            num_particles=2,
            num_steps=3,
            unmasking="maskgit",
            schedule="maskgit_cosine",
            potential=potential,
        )
        g = torch.Generator().manual_seed(0)
        return sampler.sample(model.seq_len, batch_size=2, cond=cond, generator=g)

    out = run(spec.build(**late))
    assert out.tokens.shape == (2, 2, model.seq_len)
    assert int(out.tokens.max()) < CODES and torch.isfinite(out.log_weights).all()
    # the same run with the null cond given explicitly as a dict of [1, ...] tensors
    explicit = run(ls.ProductTarget(1.5, second_cond=model.text.null_cond()))
    assert torch.equal(out.tokens, explicit.tokens)
    assert torch.equal(out.log_weights, explicit.log_weights)
    assert model.decode(out.best()).shape == (2, 1, 28, 28)
