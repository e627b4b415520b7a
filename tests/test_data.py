"""Tests of ``lightning_smc.data``: corpora, BPE tokenizer, split without leakage, packing.

Fast tests use a few Shakespeare works (``max_documents``) and a 300-id BPE; training the full
4096-id tokenizer on all of Shakespeare is marked ``slow``.
"""

import sys
import types
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lightning_smc.data import (
    EOS_ID,
    MASK_TOKEN,
    PAD_ID,
    TextDataModule,
    clean_text,
    encode_documents,
    load_corpus,
    load_tokenizer,
    pack,
    save_tokenizer,
    split_indices,
    strip_gutenberg,
    train_bpe,
)
from lightning_smc.data.corpora import FORTUNES_DIR, load_fortunes

ENGLISH = "Hello, world!  It's a fine day -- isn't it?\n\tNew line; café, naïve ☃ 42.\n"


def small_dm(tmp_path, **kwargs) -> TextDataModule:
    defaults = dict(vocab_size=300, seq_len=64, batch_size=4, val_fraction=0.34, max_documents=6)
    if kwargs.get("corpus", "shakespeare") != "shakespeare":  # a tiny local corpus
        defaults.update(vocab_size=270, max_documents=None)
    args = {"corpus": "shakespeare", **defaults, **kwargs}
    if "tokenizer_dir" not in args:  # one directory per setting, as the default under outputs/
        args["tokenizer_dir"] = str(tmp_path / Path(TextDataModule(**args).tokenizer_dir).name)
    return TextDataModule(**args)


def write_corpus(tmp_path, texts) -> str:
    """A local corpus, one file per text, named by a glob."""
    for i, text in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(text)
    return str(tmp_path / "doc*.txt")


@pytest.fixture(scope="module")
def dm(tmp_path_factory) -> TextDataModule:
    module = small_dm(tmp_path_factory.mktemp("dm"))
    module.setup()
    return module


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(load_corpus("shakespeare", max_documents=3), vocab_size=300)


# ---- corpora ------------------------------------------------------------------------------
def test_shakespeare_one_edition_per_work_without_boilerplate():
    docs = load_corpus("shakespeare")
    assert len(docs) == 42 and len(set(docs)) == 42
    titles = [d.split("\n", 1)[0].strip().upper() for d in docs]
    assert len(set(titles)) == 42  # no play twice (modern + First Folio)
    assert not any("gutenberg" in d.lower() or "\r" in d for d in docs)
    assert any(d.startswith("HAMLET, PRINCE OF DENMARK") for d in docs)


def test_strip_gutenberg_and_clean_text():
    raw = (
        "The Project Gutenberg EBook of Hamlet\nlicence blah\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nHAMLET  \r\n\n\n\n\nTo be.\n"
        "<<THIS ELECTRONIC VERSION IS COPYRIGHT 1990-1993 BY WORLD LIBRARY>>\nOr not.\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore licence\n"
    )
    assert clean_text(strip_gutenberg(raw)) == "HAMLET\n\nTo be.\nOr not."
    assert clean_text("_\bb_\bo_\bl_\bd text") == "bold text"


def test_local_corpus_directory_glob_and_single_file(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n\nstill first")
    (tmp_path / "b.txt").write_text("second document")
    (tmp_path / "c.md").write_text("not text")
    assert load_corpus(str(tmp_path)) == ["first document\n\nstill first", "second document"]
    assert load_corpus(str(tmp_path / "*.md")) == ["not text"]
    assert load_corpus(str(tmp_path / "a.txt")) == ["first document", "still first"]
    assert load_corpus(str(tmp_path), max_documents=1) == ["first document\n\nstill first"]


def test_hf_corpus_is_lazy_and_needs_datasets(monkeypatch):
    class FakeDataset:
        column_names = ["text", "id"]

        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, key):
            return [r["text"] for r in self.rows] if key == "text" else self.rows[key]

        def select(self, indices):
            return FakeDataset([self.rows[i] for i in indices])

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return FakeDataset([{"text": f"doc {i}", "id": i} for i in range(5)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    docs = load_corpus("hf:openwebtext:plain", max_documents=3)
    assert calls == [("openwebtext", "plain", "train")]
    assert len(docs) == 3 and docs[2] == "doc 2" and docs.take([0, 2]) == ["doc 0", "doc 2"]
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match="pip install datasets"):
        load_corpus("hf:openwebtext")


@pytest.mark.skipif(not FORTUNES_DIR.is_dir(), reason="Debian package `fortunes` not installed")
def test_fortunes_corpus():
    docs = load_corpus("fortunes")
    assert len(docs) > 10_000 and len(set(docs)) == len(docs)
    assert all(d and d.strip() != "%" and "\b" not in d for d in docs)
    assert all("\n%\n" not in d for d in docs)


def test_fortunes_missing_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        load_fortunes(tmp_path / "absent")


# ---- tokenizer ----------------------------------------------------------------------------
def test_special_ids_and_mask_is_last(bpe):
    tok, vocab_size, mask_id, pad_id = bpe
    assert vocab_size == len(tok) == 300 and mask_id == vocab_size - 1
    assert tok.convert_ids_to_tokens(mask_id) == MASK_TOKEN
    assert (tok.eos_token_id, pad_id) == (EOS_ID, PAD_ID) == (0, 1)


def test_round_trip_english(bpe):
    ids = encode_documents(bpe.tokenizer, [ENGLISH])[0]
    assert bpe.tokenizer.decode(ids) == ENGLISH
    assert max(ids) < bpe.mask_id


def test_special_token_text_is_not_special(bpe):
    text = f"a {MASK_TOKEN} b <|endoftext|> c"
    ids = encode_documents(bpe.tokenizer, [text])[0]
    assert bpe.mask_id not in ids and EOS_ID not in ids
    assert bpe.tokenizer.decode(ids) == text


def test_save_load_gives_identical_ids(bpe, tmp_path):
    save_tokenizer(bpe.tokenizer, tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded[1:] == bpe[1:]
    docs = [ENGLISH, "To be, or not to be: that is the question."]
    assert encode_documents(loaded.tokenizer, docs) == encode_documents(bpe.tokenizer, docs)
    fast = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert fast.mask_token_id == bpe.mask_id
    assert fast.encode(docs[0]) == encode_documents(bpe.tokenizer, docs)[0]


def test_loaded_tokenizer_without_mask_gets_one_appended(tmp_path):
    # A GPT-2-like tokenizer: byte-level BPE with only <|endoftext|>, no mask, no pad.
    gpt2_like = Tokenizer(models.BPE())
    gpt2_like.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    gpt2_like.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=270,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    gpt2_like.train_from_iterator([ENGLISH] * 5, trainer=trainer)
    size = gpt2_like.get_vocab_size()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=gpt2_like, eos_token="<|endoftext|>")
    wrapped.save_pretrained(str(tmp_path))
    tok, vocab_size, mask_id, pad_id = load_tokenizer(tmp_path)
    assert (vocab_size, mask_id) == (size + 1, size)  # as GPT-2 50257 + mask = 50258
    assert pad_id == tok.eos_token_id == 0  # padding falls back to EOS: no second extra id


def test_missing_tokenizer_and_tiny_vocab_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer="):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe(["some text"], vocab_size=100)


# ---- split, packing, data module ----------------------------------------------------------
def test_split_indices_is_a_seeded_partition():
    train, val = split_indices(20, 0.25, seed=3)
    assert sorted(train + val) == list(range(20)) and len(val) == 5
    assert split_indices(20, 0.25, seed=3) == (train, val)
    assert split_indices(20, 0.25, seed=4) != (train, val)
    assert len(split_indices(3, 0.01, seed=0)[1]) == 1  # always one validation document


def test_pack_exact():
    rows = pack([[5, 6, 7], [8, 9], [10]], eos_id=0, seq_len=4)
    np.testing.assert_array_equal(rows, [[5, 6, 7, 0], [8, 9, 0, 10]])  # tail [0] dropped
    assert pack([[1]], eos_id=0, seq_len=4).shape == (0, 4)


def test_split_never_leaks(dm):
    documents, train_idx, val_idx = dm._documents()
    assert set(train_idx).isdisjoint(val_idx) and len(val_idx) == 2
    train_text = dm.tokenizer.decode(dm.train_set.rows.ravel().tolist())
    val_text = dm.tokenizer.decode(dm.val_set.rows.ravel().tolist())
    for i in val_idx:
        doc = documents[i]
        for start in range(0, len(doc) - 200, len(doc) // 10):
            assert doc[start : start + 200] not in train_text
        assert doc[1000:1200] in val_text
    for i in train_idx:
        assert documents[i][1000:1200] not in val_text


def test_batches_shapes_and_no_mask(dm):
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 64) and batch["input_ids"].dtype == torch.long
    rows = np.concatenate([dm.train_set.rows, dm.val_set.rows])
    assert rows.max() < dm.mask_id == dm.vocab_size - 1 == 299
    assert (rows == dm.eos_id).sum() >= 1
    val_rows = sum(len(b["input_ids"]) for b in dm.val_dataloader())
    assert val_rows == len(dm.val_set)


def test_trained_tokenizer_is_saved_once_and_reused(dm, tmp_path):
    again = TextDataModule(**{**dm.hparams})
    assert again.tokenizer_dir == dm.tokenizer_dir and again.vocab_size == dm.vocab_size
    with pytest.raises(ValueError, match="tokenizer_dir="):
        TextDataModule(**{**dm.hparams, "seed": 1}).prepare_data()
    pretrained = TextDataModule(**{**dm.hparams, "tokenizer": dm.tokenizer_dir})
    assert pretrained.mask_id == dm.mask_id


def test_mask_text_in_corpus_never_becomes_mask(tmp_path):
    corpus = write_corpus(
        tmp_path, [f"document {i} says {MASK_TOKEN} loudly. " * 40 for i in range(4)]
    )
    module = small_dm(tmp_path, corpus=corpus, seq_len=16, batch_size=2, val_fraction=0.25)
    module.setup()
    assert not (module.train_set.rows == module.mask_id).any()


def test_check_compatible(dm):
    dm.check_compatible(vocab_size=dm.vocab_size, mask_id=dm.mask_id, max_len=64)
    dm.check_compatible(vocab_size=dm.vocab_size + 8)  # padded embeddings are fine
    with pytest.raises(ValueError, match="seq_len=64"):
        dm.check_compatible(vocab_size=dm.vocab_size, max_len=32)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        dm.check_compatible(vocab_size=dm.vocab_size - 1)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        dm.check_compatible(vocab_size=dm.vocab_size, mask_id=0)


def test_data_modules_share_one_base():
    """Tokenizer properties, loaders and the vocabulary check are defined once, in the base."""
    from lightning_smc.data import RewardDataModule, TokenizedDataModule

    shared = ("spec", "tokenizer", "vocab_size", "mask_id", "_require", "check_compatible",
              "train_dataloader", "val_dataloader", "_documents")  # fmt: skip
    for cls in (TextDataModule, RewardDataModule):
        assert issubclass(cls, TokenizedDataModule)
        for name in shared:
            assert name not in vars(cls), f"{cls.__name__} redefines {name}"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"seq_len": 1}, "seq_len=1"),
        ({"val_fraction": 0.0}, "val_fraction=0.0"),
        ({"val_fraction": 1.0}, "val_fraction=1.0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"vocab_size": 10}, "vocab_size=10"),
        ({"max_documents": 1}, "max_documents=1"),
    ],
)
def test_bad_arguments_name_the_field(tmp_path, override, field):
    with pytest.raises(ValueError, match=field):
        small_dm(tmp_path, **override)


def test_bad_corpora_name_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus="):
        small_dm(tmp_path, corpus=str(tmp_path / "missing")).setup()
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="corpus=.*no documents"):
        small_dm(tmp_path, corpus=str(tmp_path / "empty.txt")).setup()
    corpus = write_corpus(tmp_path, [f"Document number {i} is short. " * 5 for i in range(10)])
    with pytest.raises(ValueError, match="val split.*seq_len=200"):
        small_dm(tmp_path, corpus=corpus, val_fraction=0.1, seq_len=200, batch_size=2).setup()
    with pytest.raises(ValueError, match="batch_size=100000"):
        small_dm(tmp_path, batch_size=100_000).setup()
    (tmp_path / "one.txt").write_text("only one paragraph")
    with pytest.raises(ValueError, match="corpus=.*val_fraction"):
        small_dm(tmp_path, corpus=str(tmp_path / "one.txt")).setup()


def test_fast_dev_run(dm):
    class Embed(L.LightningModule):
        def __init__(self, vocab_size):
            super().__init__()
            self.emb = torch.nn.Embedding(vocab_size, 8)

        def training_step(self, batch, _):
            return self.emb(batch["input_ids"]).pow(2).mean()

        def validation_step(self, batch, _):
            self.log("val", self.emb(batch["input_ids"]).mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", **quiet)
    trainer.fit(Embed(dm.vocab_size), datamodule=dm)


@pytest.mark.slow
def test_full_shakespeare_tokenizer(tmp_path):
    module = TextDataModule(
        "shakespeare", vocab_size=4096, seq_len=256, tokenizer_dir=str(tmp_path / "tok")
    )
    module.setup()
    assert (module.vocab_size, module.mask_id) == (4096, 4095)
    tokens = module.train_set.num_tokens + module.val_set.num_tokens
    assert 1_400_000 < tokens < 1_700_000  # ~3.1 characters per token
    assert module.tokenizer.decode(encode_documents(module.tokenizer, [ENGLISH])[0]) == ENGLISH
