"""Native LLaDA and Dream: the Hub formats, the reference function, the denoiser contract.

The golden fixtures (``tests/goldens/{llada,dream}``, see their README) were written by the
reference modeling code at tiny random sizes: the checkpoints load strictly (LLaDA as shards
with an index, Dream as one file) and reproduce the reference logits in float32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lightning_smc as ls
from lightning_smc.models.dllm import load_dllm_tokenizer, prompt_batch, prompt_ids
from lightning_smc.models.dream import DreamConfig, DreamDenoiser, DreamModel
from lightning_smc.models.llada import LLaDAConfig, LLaDADenoiser, LLaDAModelLM

GOLDENS = Path(__file__).parent / "goldens"
MODELS = {"llada": LLaDAModelLM, "dream": DreamModel}
DENOISERS = {"llada": LLaDADenoiser, "dream": DreamDenoiser}


def checkpoint(name: str) -> Path:
    return GOLDENS / name / "checkpoint"


@pytest.fixture(scope="module")
def float_models():
    return {n: cls.from_pretrained(checkpoint(n), dtype=torch.float32) for n, cls in MODELS.items()}


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_golden_logits(float_models, name):
    golden = load_file(str(GOLDENS / name / "golden.safetensors"))
    model, x, mask = float_models[name], golden["input_ids"], golden["attention_mask"]
    with torch.no_grad():
        logits = model(x[:2]).logits
        padded = model(x, attention_mask=mask).logits
    torch.testing.assert_close(logits, golden["logits"], rtol=0, atol=1e-5)
    real = mask.bool()  # the reference leaves padded rows undefined; compare the tokens
    torch.testing.assert_close(padded[real], golden["logits_padded"][real], rtol=0, atol=1e-5)


def test_sharded_index_is_read():
    index = json.loads((checkpoint("llada") / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    assert not (checkpoint("llada") / "model.safetensors").exists()


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_bf16_load(float_models, name):
    model = MODELS[name].from_pretrained(checkpoint(name))  # the checkpoints' torch_dtype
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    golden = load_file(str(GOLDENS / name / "golden.safetensors"))
    with torch.no_grad():
        logits = model(golden["input_ids"][:2]).logits.float()
    assert (logits - golden["logits"]).abs().max() < 0.15  # bf16 arithmetic, same weights


@pytest.mark.parametrize(
    ("name", "config"), [("llada", LLaDAConfig), ("dream", DreamConfig)], ids=["llada", "dream"]
)
def test_full_size_parameter_names(name, config):
    """LLaDA-8B / Dream-7B built on the meta device have the reference's names and shapes."""
    expected = (GOLDENS / name / f"{name}_{'8b' if name == 'llada' else '7b'}_keys.txt").read_text()
    fields = {
        "num_hidden_layers": 28,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
    }
    with torch.device("meta"):
        model = MODELS[name](config() if name == "llada" else config(**fields))
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    want = dict(line.split(" ", 1) for line in expected.splitlines())
    assert got.keys() == want.keys()
    assert all(str(got[k]).replace(" ", "") == want[k].replace(" ", "") for k in got)


def _edit(tmp_path: Path, name: str, edit) -> Path:
    folder = shutil.copytree(checkpoint(name), tmp_path / name)
    file = folder / "model.safetensors"
    state = load_file(str(file))
    edit(state)
    save_file(state, str(file), metadata={"format": "pt"})
    return folder


def test_missing_and_unexpected_keys_are_named(tmp_path):
    def rename(state):
        state["model.final_norm.weight"] = state.pop("model.norm.weight")

    with pytest.raises(ValueError, match=r"missing keys \['model\.norm\.weight'\].*unexpected"):
        DreamModel.from_pretrained(_edit(tmp_path, "dream", rename))
    folder = shutil.copytree(checkpoint("llada"), tmp_path / "llada")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = "model.transformer.blocks.1.up_proj.weight"
    shard = folder / index["weight_map"].pop(key)
    state = load_file(str(shard))
    del state[key]
    save_file(state, str(shard), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="missing keys.*blocks.1.up_proj"):
        LLaDAModelLM.from_pretrained(folder)


def test_wrong_shape_and_bad_config_are_errors(tmp_path):
    def shrink(state):
        state["lm_head.weight"] = state["lm_head.weight"][:-1]

    with pytest.raises(ValueError, match=r"mismatched shapes.*lm_head\.weight.*299"):
        DreamModel.from_pretrained(_edit(tmp_path, "dream", shrink))
    with pytest.raises(ValueError, match="trust_remote_code"):
        LLaDAModelLM.from_pretrained(checkpoint("llada"), trust_remote_code=True)
    with pytest.raises(ValueError, match="alibi"):
        LLaDAConfig(alibi=True)
    with pytest.raises(ValueError, match="block_type"):
        LLaDAConfig(block_type="sequential")


@pytest.fixture(scope="module")
def denoisers(float_models):
    return {n: DENOISERS[n](m) for n, m in float_models.items()}


def test_dream_logits_are_shifted(denoisers):
    denoiser = denoisers["dream"]
    x = load_file(str(GOLDENS / "dream" / "golden.safetensors"))["input_ids"][:2]
    with torch.no_grad():
        raw = denoiser.model(x).logits
        out = denoiser(x, torch.ones(2))
    keep = torch.arange(raw.shape[-1]) != denoiser.mask_id
    torch.testing.assert_close(out[:, 1:, keep], raw[:, :-1, keep], rtol=0, atol=0)
    torch.testing.assert_close(out[:, 0, keep], raw[:, 0, keep], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_denoiser_contract(denoisers, name):
    denoiser = denoisers[name]
    x = load_file(str(GOLDENS / name / "golden.safetensors"))["input_ids"]
    assert (denoiser.vocab_size, denoiser.mask_id) == (300, 290)  # LLaDA: 320 embedding rows
    assert isinstance(denoiser, ls.Denoiser)
    with torch.no_grad():
        logits = denoiser(x, torch.full((3,), 0.5))
    assert logits.shape == (3, 16, 300) and logits.dtype == torch.float32
    assert torch.isneginf(logits[..., denoiser.mask_id]).all()
    assert torch.isfinite(logits[..., : denoiser.mask_id]).all()
    assert (logits.softmax(-1)[..., denoiser.mask_id] == 0).all()


def test_denoisers_declare_their_end_tokens(denoisers):
    """``eos_id`` from the config; the family's end-of-turn ids at the Hub vocabulary only; ids
    the model cannot emit left out; a malformed ``eos_token_id`` is an error."""
    assert denoisers["llada"].eos_id == denoisers["dream"].eos_id == (257,)  # the goldens' config
    dream_7b = {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 64,
                "num_attention_heads": 1, "num_key_value_heads": 1, "vocab_size": 152064}  # fmt: skip
    with torch.device("meta"):
        llada = LLaDADenoiser(LLaDAModelLM(LLaDAConfig(n_layers=1)))  # LLaDA-8B's ids
        dream = DreamDenoiser(DreamModel(DreamConfig(eos_token_id=151643, **dream_7b)))
        listed = DreamDenoiser(DreamModel(DreamConfig(eos_token_id=[151645, 7], **dream_7b)))
        tiny = LLaDADenoiser(LLaDAModelLM(LLaDAConfig(
            d_model=32, n_heads=2, n_kv_heads=2, n_layers=1, mlp_hidden_size=64, vocab_size=64,
            embedding_size=64, mask_token_id=63)))  # fmt: skip
    assert llada.eos_id == (126081, 126348)  # <|endoftext|>, <|eot_id|>
    assert dream.eos_id == (151643, 151645)  # <|endoftext|>, <|im_end|>
    assert listed.eos_id == (151645, 7, 151643)  # the config's first, no repeats
    assert tiny.eos_id == ()  # the default 126081 is not in a 64-token vocabulary
    with pytest.raises(TypeError, match="eos_token_id"):
        tiny.declared_end_tokens([1.5])


def test_dream_left_padding_is_invisible(denoisers):
    """Dream numbers positions after the padding: a padded prompt scores like the bare one."""
    denoiser, x = denoisers["dream"], torch.randint(0, 250, (1, 10))
    padded = torch.cat([torch.full((1, 4), 257), x], dim=1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 3)], dim=1).long()  # a [B, P] prompt mask
    with torch.no_grad():
        bare, out = denoiser(x), denoiser(padded, None, {"attention_mask": mask})
    torch.testing.assert_close(out[:, 5:], bare[:, 1:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_sampler_keeps_left_padded_prompts(denoisers, name):
    denoiser = denoisers[name]
    prompt = torch.tensor([[257, 257, 11, 12, 13], [21, 22, 23, 24, 25]])
    mask = (prompt != 257).long()
    sampler = ls.SMCSampler(
        denoiser,
        num_particles=2,
        num_steps=4,
        unmasking="low_confidence",
        block_length=4,
        potential=ls.SelfReward(),
    )
    out = sampler.sample(
        13, prompt=prompt, cond={"attention_mask": mask}, generator=torch.Generator().manual_seed(0)
    )
    assert out.tokens.shape == (2, 2, 13)
    assert (out.tokens[:, :, :5] == prompt[:, None]).all()
    assert not (out.tokens == denoiser.mask_id).any()
    assert (out.tokens < denoiser.vocab_size).all()


def _tokenizer_folder(tmp_path: Path, dream: bool) -> Path:
    """A tiny byte-level BPE saved as a Hub folder: LLaDA-like (tokenizer.json) or Dream-like
    (vocab.json + merges.txt and a ``tokenizer_class`` only remote code defines)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = (
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        decoders.ByteLevel(),
    )
    trainer = trainers.BpeTrainer(
        vocab_size=290, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["what is two plus three? the answer is five."] * 8, trainer)
    template = (
        "{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|eot|>{% endfor %}"
        "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
    )
    folder = tmp_path / ("dream_tok" if dream else "llada_tok")
    specials = ["<|eos|>", "<|start|>", "<|eot|>", "<|mask|>"]
    if not dream:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|eos|>"
        )
        fast.add_special_tokens({"additional_special_tokens": specials[1:]})
        fast.chat_template = template
        fast.save_pretrained(folder)
        return folder
    folder.mkdir()
    tok.model.save(str(folder))
    n = tok.get_vocab_size()
    added = {str(n + i): {"content": s, "special": True} for i, s in enumerate(specials)}
    config = {
        "tokenizer_class": "DreamTokenizer",
        "chat_template": template,
        "eos_token": "<|eos|>",
        "pad_token": "<|eos|>",
        "added_tokens_decoder": added,
        "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("dream", [False, True], ids=["llada", "dream"])
def test_tokenizer_and_chat_prompts(tmp_path, dream):
    tok = load_dllm_tokenizer(_tokenizer_folder(tmp_path, dream))
    ids = prompt_ids(tok, "what is two plus three?")
    assert tok.decode(ids) == "<|start|>user\nwhat is two plus three?<|eot|><|start|>assistant\n"
    assert tok.decode(prompt_ids(tok, "five", chat=False)) == "five"
    batch, mask = prompt_batch(tok, ["what is two plus three?", "five"])
    pad = tok.convert_tokens_to_ids("<|eos|>")
    short = prompt_ids(tok, "five")
    assert batch.shape == mask.shape == (2, len(ids))
    assert batch[1, -len(short) :].tolist() == short and (batch[1, : -len(short)] == pad).all()
    assert mask[1].tolist() == [0] * (len(ids) - len(short)) + [1] * len(short)
    with pytest.raises(ValueError, match="mask id"):
        prompt_batch(tok, ["five"], mask_id=pad)
