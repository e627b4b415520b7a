"""Text data for masked diffusion: corpora, tokenizers, and the packed ``TextDataModule``.

``corpora``  raw documents: ``"shakespeare"``, ``"fortunes"``, ``"hf:NAME[:CONFIG]"``, paths
``tokenizer`` byte-level BPE training (mask = last id) and loading of local HF tokenizers
``packing``  document-level train/val split and EOS-joined packing into ``seq_len`` rows
``base``     ``TokenizedDataModule``: the tokenizer properties, loaders and vocabulary check
             that the data modules share
``text``     ``TextDataModule``: packed rows for pretraining a denoiser
``reward``   ``RewardDataModule``: rows labelled by a text scorer, for a ``LearnedReward``
``reasoning`` ``load_benchmark``: the packaged GSM8K / MATH-500 / MBPP / HumanEval test splits
``arithmetic`` seeded arithmetic word problems (``ArithmeticDataModule``) for the embedded
             reasoning model

Example::

    from lightning_smc.data import TextDataModule
    dm = TextDataModule("shakespeare", vocab_size=4096, seq_len=256, batch_size=32)
    dm.setup()
    dm.vocab_size, dm.mask_id          # 4096, 4095
"""

from ..models.tokenizer import (
    EOS_ID,
    EOS_TOKEN,
    MASK_TOKEN,
    PAD_ID,
    PAD_TOKEN,
    TokenizerSpec,
    encode_documents,
    load_tokenizer,
    save_tokenizer,
    tokenizer_spec,
    train_bpe,
    wrap_bpe,
)
from .arithmetic import ArithmeticDataModule
from .base import TokenizedDataModule
from .corpora import CORPORA, HFDocuments, clean_text, load_corpus, strip_gutenberg
from .packing import PackedSequences, pack, split_indices
from .reasoning import load_benchmark
from .reward import LabelledChunks, RewardDataModule
from .text import TextDataModule

__all__ = [
    "ArithmeticDataModule",
    "CORPORA",
    "EOS_ID",
    "EOS_TOKEN",
    "HFDocuments",
    "LabelledChunks",
    "MASK_TOKEN",
    "PAD_ID",
    "PAD_TOKEN",
    "PackedSequences",
    "RewardDataModule",
    "TextDataModule",
    "TokenizedDataModule",
    "TokenizerSpec",
    "clean_text",
    "encode_documents",
    "load_benchmark",
    "load_corpus",
    "load_tokenizer",
    "pack",
    "save_tokenizer",
    "split_indices",
    "strip_gutenberg",
    "tokenizer_spec",
    "train_bpe",
    "wrap_bpe",
]
