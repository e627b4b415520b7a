"""Rewards (issue 4): text scorers, the HF classifier reward, the learned differentiable reward,
its training module and data, and the embedded sentiment reward asset."""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from lightning_smc.data import RewardDataModule, load_tokenizer
from lightning_smc.modules import RewardModelModule
from lightning_smc.rewards import (
    EMBEDDED_MODEL,
    EMBEDDED_SENTIMENT_REWARD,
    AfinnSentiment,
    HFClassifierReward,
    LearnedReward,
    ProfanityToxicity,
    Reward,
    TextReward,
    VaderSentiment,
    WordListToxicity,
    check_reward_output,
)

POSITIVE, NEGATIVE = "I love this wonderful day", "I hate this awful day"
TOXIC, CLEAN = "you are a stupid fucking idiot and a whore", "have a nice and happy afternoon"


@pytest.fixture(scope="module")
def spec():
    return load_tokenizer(EMBEDDED_MODEL)


def encode(spec, texts: list[str], length: int | None = None) -> torch.Tensor:
    """Embedded-tokenizer ids of ``texts``, right-padded with ``pad_id`` to a common length."""
    ids = [spec.tokenizer.encode(t, add_special_tokens=False) for t in texts]
    length = length or max(map(len, ids))
    return torch.tensor([(i + [spec.pad_id] * length)[:length] for i in ids])


# ---- text rewards ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "high", "low"),
    [
        (VaderSentiment, POSITIVE, NEGATIVE),
        (AfinnSentiment, POSITIVE, NEGATIVE),
        (ProfanityToxicity, TOXIC, CLEAN),
        (WordListToxicity, TOXIC, CLEAN),
    ],
)
def test_text_rewards_rank_known_strings(cls, high, low, spec):
    reward = cls(tokenizer="embedded")
    assert isinstance(reward, Reward) and reward.differentiable is False and reward.name
    x0 = encode(spec, [high, low, high])
    value = reward(x0)
    assert value.shape == (3,) and value.dtype == torch.float64
    assert value[0] > value[1] and value[0] == value[2]
    assert reward.score_texts([high, low]) == pytest.approx(value[:2].tolist())
    assert reward.success(x0).tolist() == [True, False, True]
    assert reward.success_rate(x0) == pytest.approx(2 / 3)


def test_scale_flips_reward_and_success_direction(spec):
    x0 = encode(spec, [TOXIC, CLEAN])
    plain, detox = ProfanityToxicity("embedded"), ProfanityToxicity("embedded", scale=-1.0)
    assert torch.equal(detox(x0), -plain(x0))
    assert torch.equal(detox.score(x0), plain.score(x0))  # raw scores ignore the scale
    assert detox.success(x0).tolist() == [False, True]  # success = low toxicity
    assert VaderSentiment("embedded", success_threshold=0.99).success_rate(x0) == 0.0


def test_decode_drops_mask_and_pad_and_splits_at_specials(spec):
    reward = VaderSentiment().bind_tokenizer(spec)
    good, day = (spec.tokenizer.encode(w, add_special_tokens=False) for w in ("Good", " day"))
    row = [spec.mask_id, *good, spec.pad_id, 0, *day, spec.mask_id, spec.pad_id]  # 0 = EOS
    assert reward.decode(torch.tensor([row])) == ["Good\n day"]
    everything_masked = torch.full((2, 5), spec.mask_id)
    assert reward.decode(everything_masked) == ["", ""]
    assert reward(everything_masked).tolist() == [0.0, 0.0]


def test_text_reward_bad_inputs_are_clear_errors(spec):
    with pytest.raises(RuntimeError, match=r"tokenizer=.*bind_tokenizer"):
        VaderSentiment()(encode(spec, [POSITIVE]))
    reward = VaderSentiment(tokenizer=EMBEDDED_MODEL)  # a directory works as well as "embedded"
    with pytest.raises(TypeError, match="not differentiable"):
        reward(torch.rand(1, 4, spec.vocab_size))
    with pytest.raises(ValueError, match=r"\[0, 4096\)"):
        reward(torch.tensor([[1, 4096]]))
    with pytest.raises(ValueError, match="scale"):
        VaderSentiment(scale=0.0)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        VaderSentiment(tokenizer="/no_such_dir")


def test_nan_scores_are_caught_and_name_the_reward(spec):
    class Broken(TextReward):
        def score_texts(self, texts):
            return [math.nan] * len(texts)

    with pytest.raises(ValueError, match="Broken.*non-finite"):
        Broken("embedded")(encode(spec, [POSITIVE]))
    with pytest.raises(ValueError, match="shape"):
        check_reward_output(Broken(), torch.zeros(3), 2)


# ---- Hugging Face classifier ----------------------------------------------------------------
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "i", "love", "hate", "this", "wonderful", "awful"]


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A 1-layer BERT sentiment classifier with a word-level tokenizer, saved like a hub model."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():  # make "love" push toward "positive" so the ranking is meaningful
        model.bert.embeddings.word_embeddings.weight[WORDS.index("love")] *= 4
    directory = tmp_path_factory.mktemp("tiny_classifier")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, model, tokenizer


@pytest.mark.parametrize("output", ["log_prob", "prob", "logit"])
def test_hf_classifier_reward_equals_direct_computation(tiny_classifier, spec, output):
    directory, model, tokenizer = tiny_classifier
    reward = HFClassifierReward(
        directory, label="positive", tokenizer="embedded", output=output, batch_size=2
    )
    texts = [POSITIVE, NEGATIVE, "this awful wonderful day", "love love"]
    value = reward(encode(spec, texts))
    assert value.shape == (4,) and value.dtype == torch.float64
    with torch.no_grad():
        inputs = tokenizer(texts, padding=True, return_tensors="pt")
        logits = model(**inputs).logits.double()
    direct = {
        "log_prob": torch.log_softmax(logits, -1),
        "prob": torch.softmax(logits, -1),
        "logit": logits,
    }[output][:, 1]
    torch.testing.assert_close(value, direct, rtol=1e-5, atol=1e-6)
    by_index = HFClassifierReward(directory, label=1, tokenizer=spec, output=output)
    torch.testing.assert_close(by_index(encode(spec, texts)), value)


def test_hf_classifier_bad_paths_and_labels(tiny_classifier, tmp_path):
    directory = tiny_classifier[0]
    with pytest.raises(FileNotFoundError, match="no_such_classifier"):
        HFClassifierReward(tmp_path / "no_such_classifier", label=0)
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-model"):
        HFClassifierReward("no-such-org/no-such-model", label=0, local_files_only=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="empty"):
        HFClassifierReward(tmp_path / "empty", label=0)
    with pytest.raises(ValueError, match=r"'toxic'.*\['negative', 'positive'\]"):
        HFClassifierReward(directory, label="toxic")
    with pytest.raises(ValueError, match="out of range"):
        HFClassifierReward(directory, label=2)
    with pytest.raises(ValueError, match="output"):
        HFClassifierReward(directory, label=0, output="score")


# ---- learned differentiable reward -------------------------------------------------------------
def tiny_learned(**fields) -> LearnedReward:
    torch.manual_seed(0)
    reward = LearnedReward(vocab_size=50, embed_dim=8, hidden_dim=16, **fields)
    with torch.no_grad():  # the head starts at zero; give it weights so outputs differ
        reward.head.weight.normal_(std=0.05)
    return reward.eval()


def test_learned_reward_ids_equal_one_hot_and_gradients_flow():
    reward = tiny_learned()
    assert isinstance(reward, Reward) and reward.differentiable is True
    x0 = torch.randint(0, 49, (4, 12), generator=torch.Generator().manual_seed(0))
    by_ids = reward(x0)
    assert by_ids.shape == (4,) and by_ids.dtype == torch.float64
    assert torch.equal(by_ids, reward(F.one_hot(x0, 50).float()))
    assert by_ids.std() > 0
    soft = torch.softmax(torch.randn(4, 12, 50), -1)
    soft[..., reward.mask_id] = 0.0  # the sampler's relaxed samples never put mass on the mask
    soft.requires_grad_(True)
    reward(soft).sum().backward()
    assert soft.grad is not None and torch.isfinite(soft.grad).all() and soft.grad.abs().sum() > 0


def test_learned_reward_ignores_pad_and_mask_positions():
    reward = tiny_learned(ignored_ids=[1, 49], pooling="sum")
    assert reward.config.ignored_ids == [1, 49]
    x0 = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]])
    padded = torch.tensor([[5, 6, 7, 8, 1, 1, 1, 1], [5, 6, 49, 7, 8, 1, 49, 1]])
    with torch.no_grad():
        base, with_pads = reward(x0), reward(padded)
        embedding, weight = reward.embed(padded)
    assert torch.equal(weight, ((padded != 1) & (padded != 49)).float())
    assert embedding[weight == 0].abs().sum() == 0
    assert torch.equal(with_pads, reward(F.one_hot(padded, 50).float()))
    assert not torch.equal(base, with_pads)  # pads still change their neighbours' context
    soft = F.one_hot(padded, 50).float()
    soft[0, 4:] = 0.0  # a soft row with no mass at all at the pad positions weighs them 0 too
    assert torch.allclose(reward(soft)[0], with_pads[0])


def test_learned_reward_save_load_round_trip(tmp_path, spec):
    reward = tiny_learned(success_threshold=0.3, name="tiny", pooling="mean", activation="linear")
    x0 = torch.randint(0, 49, (3, 7), generator=torch.Generator().manual_seed(1))
    reward.save_pretrained(tmp_path / "r", tokenizer=spec)
    loaded = LearnedReward.from_pretrained(tmp_path / "r")
    assert torch.equal(loaded(x0), reward(x0)) and not loaded.training
    assert loaded.config == reward.config and loaded.success_threshold == 0.3
    assert json.loads((tmp_path / "r/config.json").read_text())["model_type"] == (
        "lightning_smc_learned_reward"
    )
    assert load_tokenizer(tmp_path / "r").vocab_size == spec.vocab_size  # self-contained
    assert loaded.success(x0).tolist() == (loaded(x0) > 0.3).tolist()


def test_learned_reward_bad_inputs_are_clear_errors(tmp_path):
    reward = tiny_learned()
    with pytest.raises(ValueError, match=r"V=49 .*vocab_size=50"):
        reward(torch.rand(2, 5, 49))
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        reward(torch.tensor([[0, 50]]))
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        reward(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(FileNotFoundError, match="config.json"):
        LearnedReward.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="kernel_size"):
        LearnedReward(vocab_size=50, kernel_size=4)
    with torch.no_grad():
        reward.out_bias.fill_(math.nan)
    with pytest.raises(ValueError, match="LearnedReward.*non-finite"):
        reward(torch.zeros(1, 3, dtype=torch.long))


# ---- the embedded asset ---------------------------------------------------------------------
HELD_OUT = [
    "What a lovely, happy and joyful morning, my dear friend.",
    "I am glad to see thee; thou art kind and good and true.",
    "Sweet love, thy beauty is a blessing and a delight.",
    "The weather is a day like any other day.",
    "He walked to the market and bought some bread.",
    "O wretched, miserable villain! Thou hast killed my brother.",
    "I hate thee, foul and cruel traitor; die in pain and shame.",
    "Death, grief and sorrow; the poor sad widow weeps alone.",
]


def test_embedded_sentiment_reward_tracks_vader(spec):
    reward = LearnedReward.from_pretrained("embedded")
    assert reward.vocab_size == spec.vocab_size and reward.mask_id == spec.mask_id
    assert load_tokenizer(EMBEDDED_SENTIMENT_REWARD).vocab_size == spec.vocab_size
    x0 = encode(spec, HELD_OUT)  # right-padded: pad positions are ignored by the reward
    with torch.no_grad():
        learned = reward(x0)
    vader = VaderSentiment(spec)(x0)
    assert learned.shape == (len(HELD_OUT),) and torch.isfinite(learned).all()
    assert spearmanr(learned.numpy(), vader.numpy())[0] > 0.5
    assert learned[:3].mean() > learned[-3:].mean()
    with torch.no_grad():  # right padding barely moves a score: pads are ignored positions
        alone = torch.cat([reward(encode(spec, [text])) for text in HELD_OUT])
    torch.testing.assert_close(learned, alone, atol=0.05, rtol=0)


# ---- training module and data -----------------------------------------------------------------
SENTENCES = [
    "What a wonderful, happy and lovely day.",
    "I love my kind and gentle friends.",
    "This is a great joy and a sweet delight.",
    "The house stands at the end of the road.",
    "He said that the ship would sail at noon.",
    "I hate this awful, cruel and miserable place.",
    "The villain killed him; grief and death follow.",
    "Sorrow, pain and shame upon this wretched land.",
]


@pytest.fixture
def tiny_corpus(tmp_path):
    """Ten documents, each a seeded mixture of positive, neutral and negative sentences."""
    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in range(10):
        sentences = rng.choice(SENTENCES, size=40)
        (corpus / f"doc{d:02d}.txt").write_text(f"Document {d}. " + " ".join(sentences))
    return corpus


def test_reward_data_module_labels_splits_and_caches(tiny_corpus, tmp_path):
    kwargs = dict(corpus=str(tiny_corpus), seq_len=16, batch_size=4, val_fraction=0.2, seed=3)
    dm = RewardDataModule(cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.setup()
    assert dm.vocab_size == 4096 and dm.mask_id == 4095
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 16) and batch["score"].dtype == torch.float32
    vader = VaderSentiment("embedded")
    rows = torch.from_numpy(dm.val_set.rows[:5].astype(np.int64))
    np.testing.assert_allclose(dm.val_scores[:5], vader(rows).numpy(), atol=1e-6)
    # whole documents go to one side: "Document k." headers never appear on both
    headers = {
        name: {t.split(".")[0] for t in vader.decode(torch.from_numpy(s.rows.astype(np.int64)))}
        for name, s in (("train", dm.train_set), ("val", dm.val_set))
    }
    train_docs = {h for t in headers["train"] for h in [t] if "Document" in h}
    val_docs = {h for t in headers["val"] for h in [t] if "Document" in h}
    assert val_docs and train_docs and not (train_docs & val_docs)
    assert len(list((tmp_path / "cache").glob("vader-*.npz"))) == 1
    again = RewardDataModule(cache_dir=str(tmp_path / "cache"), **kwargs)
    again.setup()
    assert np.array_equal(again.train_set.rows, dm.train_set.rows)
    assert np.array_equal(again.train_scores, dm.train_scores)


def test_reward_model_module_fit_lowers_the_loss_and_exports(tiny_corpus, tmp_path):
    dm = RewardDataModule(
        corpus=str(tiny_corpus), seq_len=16, batch_size=16, val_fraction=0.2, cache_dir=None
    )
    dm.setup()
    torch.manual_seed(0)
    reward = LearnedReward(vocab_size=dm.vocab_size, embed_dim=16, hidden_dim=16, n_layers=1)
    module = RewardModelModule(reward, lr=1e-2, warmup_steps=5, export_dir=str(tmp_path / "out"))
    x0 = torch.from_numpy(dm.train_set.rows.astype(np.int64))
    y = torch.from_numpy(dm.train_scores)

    def mse() -> float:
        with torch.no_grad():
            value = F.mse_loss(reward.eval().predict(x0), y).item()
        reward.train()
        return value

    before = mse()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_steps=40,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    after = mse()
    assert after < 0.6 * before
    exported = LearnedReward.from_pretrained(tmp_path / "out")
    assert torch.equal(exported(x0[:4]), reward.eval()(x0[:4]))
    assert (tmp_path / "out/tokenizer.json").is_file()


def test_reward_model_module_checks(tiny_corpus):
    with pytest.raises(ValueError, match="log_sigmoid"):
        RewardModelModule(LearnedReward(vocab_size=50), loss="bce")
    module = RewardModelModule(LearnedReward(vocab_size=50), loss="mse")
    dm = RewardDataModule(corpus=str(tiny_corpus), seq_len=16, batch_size=2, cache_dir=None)
    with pytest.raises(ValueError, match=r"vocabulary mismatch.*4096.*vocab_size=50"):
        dm.check_compatible(vocab_size=module.reward.vocab_size, mask_id=module.reward.mask_id)
    bce = RewardModelModule(LearnedReward(vocab_size=50, activation="log_sigmoid"), loss="bce")
    batch = {"input_ids": torch.randint(0, 49, (4, 8)), "score": torch.tensor([0.9, -0.5, 0.2, 0])}
    loss, prediction = bce._loss(batch)
    assert torch.isfinite(loss) and (prediction <= 0).all()  # log-probabilities
