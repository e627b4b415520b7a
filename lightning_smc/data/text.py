"""``TextDataModule``: a corpus, a tokenizer and packed fixed-length rows for MDLM training.

Pipeline: ``load_corpus`` (documents) -> ``split_indices`` (whole documents to train or val,
seeded) -> tokenizer (``tokenizer=None``: a byte-level BPE trained on the *train* documents,
saved once into ``tokenizer_dir``; else a local HF tokenizer) -> ``encode_documents`` ->
``pack`` (documents joined by EOS, cut into ``seq_len`` rows). Batches are dicts
``{"input_ids": LongTensor[batch_size, seq_len]}``; ``mask_id`` never occurs in them.
Training batches are drawn in a permutation seeded by ``(seed, epoch)`` and the train loader is
stateful, so a run resumed from a mid-epoch checkpoint sees exactly the batches that the
uninterrupted run would have seen (``lightning_smc.data.packing.ResumableDataLoader``).

``vocab_size``, ``mask_id``, ``pad_id``, ``eos_id`` and ``tokenizer`` are available after
``setup()``, and also before it (the tokenizer alone is loaded, or trained, on first use), so a
model can be built from them. ``vocab_size`` there is the *effective* size, mask included,
which can differ from the ``vocab_size`` argument (a loaded tokenizer; a tiny corpus).

Example::

    dm = TextDataModule("shakespeare", vocab_size=4096, seq_len=256, batch_size=32)
    dm.setup()
    model = MDLM(vocab_size=dm.vocab_size, mask_id=dm.mask_id, ...)
    dm.check_compatible(vocab_size=model.vocab_size, mask_id=model.mask_id, max_len=1024)
    batch = next(iter(dm.train_dataloader()))      # batch["input_ids"]: [32, 256]
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..models.loading import read_json
from ..models.tokenizer import (
    MIN_VOCAB_SIZE,
    TokenizerSpec,
    encode_documents,
    load_tokenizer,
    save_tokenizer,
    train_bpe,
)
from .base import TokenizedDataModule
from .packing import PackedSequences, pack, token_dtype

META_FILE = "lightning_smc_tokenizer.json"  # what a trained tokenizer was trained on
ENCODE_CHUNK = 2048  # documents per encode call: bounded memory on OpenWebText-sized corpora


class TextDataModule(TokenizedDataModule):
    """Packed text for masked-diffusion language modelling.

    Args:
        corpus: ``"shakespeare"``, ``"fortunes"``, ``"hf:NAME[:CONFIG]"``, or a local file,
            directory or glob (see ``lightning_smc.data.corpora``).
        tokenizer: a ``save_pretrained`` directory or locally cached HF name (a mask token is
            appended if it has none); ``None`` trains a byte-level BPE into ``tokenizer_dir``.
        vocab_size: ids of the BPE to train, specials and mask included (``mask_id =
            vocab_size - 1``); ignored when ``tokenizer`` is given.
        seq_len: tokens per packed row (>= 2).
        batch_size: rows per batch (>= 1).
        val_fraction: fraction of *documents* held out for validation, in (0, 1).
        seed: seed of the document split and of the per-epoch shuffle of training rows.
        num_workers: DataLoader worker processes.
        max_documents: keep only the first documents of the corpus (tests, smoke runs).
        tokenizer_dir: where the trained BPE is saved and reused; ``None`` picks
            ``outputs/tokenizers/<corpus>-v<vocab_size>-<hash of the split settings>``.
    """

    padded_vocab_ok = True  # a denoiser's logits may cover padding ids beyond the tokenizer's

    def __init__(
        self,
        corpus: str = "shakespeare",
        tokenizer: str | None = None,
        vocab_size: int = 4096,
        seq_len: int = 256,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        seed: int = 0,
        num_workers: int = 0,
        max_documents: int | None = None,
        tokenizer_dir: str | None = None,
    ) -> None:
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size={vocab_size} must be >= {MIN_VOCAB_SIZE}")
        super().__init__(
            corpus, tokenizer, seq_len, batch_size, val_fraction, seed, num_workers, max_documents
        )
        if tokenizer is None and tokenizer_dir is None:
            tokenizer_dir = str(default_tokenizer_dir(self._meta_of(locals())))
        self.save_hyperparameters()
        self.tokenizer_dir = tokenizer_dir
        self.requested_vocab_size = vocab_size

    # ---- tokenizer --------------------------------------------------------------------
    @staticmethod
    def _meta_of(args: dict) -> dict:
        keys = ("corpus", "vocab_size", "val_fraction", "seed", "max_documents")
        return {k: args[k] for k in keys}

    @property
    def meta(self) -> dict:
        """The settings a trained tokenizer depends on (it is fitted on the train split)."""
        return self._meta_of(dict(self.hparams))

    def prepare_data(self) -> None:
        """Train the BPE on the train documents and save it, unless ``tokenizer_dir`` has it."""
        if self.tokenizer_name is not None:
            return
        directory = Path(self.tokenizer_dir)
        if (directory / "tokenizer.json").exists():
            self._check_meta(directory)
            return
        documents, train_idx, _ = self._documents()
        spec = train_bpe(_iter_docs(documents, train_idx), vocab_size=self.requested_vocab_size)
        save_tokenizer(spec.tokenizer, directory)
        (directory / META_FILE).write_text(json.dumps(self.meta, indent=2) + "\n")

    def _check_meta(self, directory: Path) -> None:
        path = directory / META_FILE
        saved = read_json(path, "the trained BPE's settings") if path.exists() else self.meta
        if saved != self.meta:
            raise ValueError(
                f"tokenizer_dir={str(directory)!r} holds a BPE trained for {saved}, not "
                f"{self.meta}: pass another tokenizer_dir (or None), or delete that directory"
            )

    def _load_spec(self) -> TokenizerSpec:
        """The given tokenizer, or the BPE trained (once) into ``tokenizer_dir``."""
        self.prepare_data()
        return load_tokenizer(self.tokenizer_name or self.tokenizer_dir)

    def _tokenizer_label(self) -> str:
        return repr(str(self.tokenizer_name or self.tokenizer_dir))

    # ---- data -------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Split, tokenize and pack both splits (once; later calls are no-ops)."""
        if self.train_set is not None:
            return
        documents, train_idx, val_idx = self._documents()
        self.train_set = self._pack_split(documents, train_idx, "train")
        self.val_set = self._pack_split(documents, val_idx, "val")
        self._check_train_rows()

    def _pack_split(self, documents: Sequence[str], indices: list[int], name: str):
        spec = self.spec
        ids = _encode(spec.tokenizer, documents, indices)
        rows = pack(ids, self.eos_id, self.seq_len, dtype=token_dtype(spec.vocab_size))
        if (rows == spec.mask_id).any():
            raise ValueError(
                f"{name} data contains mask_id={spec.mask_id}; the tokenizer maps "
                "text onto its mask token and cannot be used for diffusion"
            )
        if len(rows) == 0:
            raise ValueError(
                f"corpus={self.corpus!r}: the {name} split ({len(indices)} documents) has "
                f"fewer than seq_len={self.seq_len} tokens, so not one {name} batch: raise "
                "max_documents or val_fraction, or lower seq_len"
            )
        return PackedSequences(rows)


def default_tokenizer_dir(meta: dict) -> Path:
    """``outputs/tokenizers/<corpus>-v<vocab>-<hash of meta>``: one directory per setting."""
    digest = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:8]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", meta["corpus"]).strip("-")[-40:] or "corpus"
    return Path("outputs") / "tokenizers" / f"{slug}-v{meta['vocab_size']}-{digest}"


def _iter_docs(documents: Sequence[str], indices: list[int]) -> Iterator[str]:
    for start in range(0, len(indices), ENCODE_CHUNK):
        chunk = indices[start : start + ENCODE_CHUNK]
        yield from (
            documents.take(chunk) if hasattr(documents, "take") else [documents[i] for i in chunk]
        )


def _encode(tokenizer, documents: Sequence[str], indices: list[int]) -> Iterator[list[int]]:
    for start in range(0, len(indices), ENCODE_CHUNK):
        chunk = list(_iter_docs(documents, indices[start : start + ENCODE_CHUNK]))
        yield from encode_documents(tokenizer, chunk)
