"""Tokenizers for masked diffusion: a byte-level BPE trained here, or any local HF tokenizer.

Special tokens of a BPE trained by ``train_bpe(documents, vocab_size=V)``:

============  =====================  ======================================================
token         id                     role
============  =====================  ======================================================
``<|endoftext|>``  ``0`` (``EOS_ID``)   document separator when packing; also ``bos_token``
``<|pad|>``        ``1`` (``PAD_ID``)   padding (packed data never needs it)
byte alphabet      ``2 .. 257``         the 256 byte-level symbols (no ``unk`` needed)
merges             ``258 .. V - 2``     BPE merges, most frequent first
``<|mask|>``       ``V - 1``            ``mask_id``: the absorbing state, always the LAST id
============  =====================  ======================================================

so ``mask_id = vocab_size - 1`` exactly as in MDLM, and the denoiser's logits cover
``vocab_size`` entries, mask included. (On a corpus too small to learn ``V - 259`` merges the
vocabulary comes out smaller, with a warning; the mask is still last.)

``load_tokenizer(name_or_path)`` loads a ``save_pretrained`` directory (ours or any other) with
``AutoTokenizer`` from local files only. A tokenizer without a mask token gets ``<|mask|>``
appended as its last id (GPT-2: 50257 entries + mask = 50258, as MDLM on OpenWebText); one
with a mask token keeps its id. A tokenizer without a pad token pads with EOS rather than gain
a second extra entry. Both return a ``TokenizerSpec(tokenizer, vocab_size, mask_id, pad_id)``::

    spec = train_bpe(load_corpus("shakespeare"), vocab_size=4096)
    save_tokenizer(spec.tokenizer, "outputs/tokenizer")        # tokenizer.json + config
    tok, vocab_size, mask_id, pad_id = load_tokenizer("outputs/tokenizer")  # same ids

``encode_documents`` treats special-token strings inside raw text as plain text, so a
document containing ``"<|mask|>"`` never produces ``mask_id``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS_TOKEN, PAD_TOKEN, MASK_TOKEN = "<|endoftext|>", "<|pad|>", "<|mask|>"
EOS_ID, PAD_ID = 0, 1
NUM_BYTES = 256
MIN_VOCAB_SIZE = 2 + NUM_BYTES + 1  # eos, pad, the byte alphabet, mask


class TokenizerSpec(NamedTuple):
    """A tokenizer with the ids a masked-diffusion model needs; ``vocab_size`` includes mask."""

    tokenizer: PreTrainedTokenizerBase
    vocab_size: int
    mask_id: int
    pad_id: int


def train_bpe(
    documents: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2
) -> TokenizerSpec:
    """Train a byte-level BPE of ``vocab_size`` ids (specials and mask included) on documents."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs at least "
            f"{MIN_VOCAB_SIZE} (eos, pad, 256 bytes, mask)"
        )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # the mask is appended after training, as the last id
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(documents, trainer=trainer)
    bpe.add_special_tokens([MASK_TOKEN])
    if bpe.get_vocab_size() < vocab_size:
        warnings.warn(
            f"vocab_size={vocab_size} asked, but the corpus supports only "
            f"{bpe.get_vocab_size()} ids; the mask is still the last id",
            stacklevel=2,
        )
    return tokenizer_spec(wrap_bpe(bpe))


def wrap_bpe(bpe: Tokenizer) -> PreTrainedTokenizerFast:
    """A ``transformers`` tokenizer around a trained BPE, ready for ``save_pretrained``."""
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN,
        clean_up_tokenization_spaces=False,  # keep decode(encode(text)) == text
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> Path:
    """``save_pretrained`` into ``directory``, loadable as ``PreTrainedTokenizerFast``."""
    directory = Path(directory)
    tokenizer.save_pretrained(str(directory))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        # transformers 5 writes its new class name; the old one loads under 4.x and 5.x alike.
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_tokenizer(name_or_path: str | Path) -> TokenizerSpec:
    """Load a local tokenizer directory or cached HF name; append a mask token if it has none."""
    path = Path(name_or_path)
    try:
        if (path / "tokenizer.json").is_file() and (path / "config.json").is_file():
            # A model checkpoint directory: its config.json describes the model (e.g. model_type
            # "mdlm"), which AutoTokenizer would try, and fail, to interpret.
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"tokenizer={str(name_or_path)!r} is neither a tokenizer directory "
            "(save_pretrained: tokenizer.json, tokenizer_config.json) nor a name in the local "
            "Hugging Face cache; there is no hub access at run time. Pass an existing "
            "directory, or tokenizer=None to train a BPE into tokenizer_dir"
        ) from err
    if tokenizer.mask_token is None:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    return tokenizer_spec(tokenizer)


def tokenizer_spec(tokenizer: PreTrainedTokenizerBase) -> TokenizerSpec:
    """``(tokenizer, vocab_size, mask_id, pad_id)``; ``vocab_size`` covers every id, mask too."""
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise ValueError("the tokenizer has no mask token; load it with load_tokenizer")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)
    vocab_size = max(len(tokenizer), mask_id + 1)
    return TokenizerSpec(tokenizer, vocab_size, mask_id, pad_id)


def eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The document separator: EOS, else SEP (BERT-style tokenizers)."""
    for token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if token_id is not None:
            return token_id
    raise ValueError("the tokenizer has neither an eos nor a sep token to separate documents")


def encode_documents(
    tokenizer: PreTrainedTokenizerBase, documents: Sequence[str]
) -> list[list[int]]:
    """Token ids of each document, no specials added; special-token text is encoded as text."""
    if not getattr(tokenizer, "is_fast", False):
        return [
            tokenizer.encode(d, add_special_tokens=False, split_special_tokens=True)
            for d in documents
        ]
    backend = tokenizer.backend_tokenizer
    before = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        return [e.ids for e in backend.encode_batch(list(documents), add_special_tokens=False)]
    finally:
        backend.encode_special_tokens = before
