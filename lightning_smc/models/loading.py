"""Checkpoint directories: the embedded base model and ``save_pretrained`` folders with a tokenizer.

``resolve_checkpoint("embedded")`` is the model that ships with the package
(``lightning_smc/assets/mdlm_tiny``); any other value is a folder path.
``resolve_adapter("embedded")`` is the amortized sentiment proposal trained for it.
``load_model(name_or_path, tokenizer=None)`` returns ``(denoiser, tokenizer spec)`` and checks
that they agree; ``load_denoiser(name_or_path)`` the denoiser alone.

**Backbones.** A folder's ``config.json`` says which denoiser reads it (``model_kind``): its
``model_type`` (``"llada"``, ``"Dream"``) or ``architectures`` (``LLaDAModelLM``,
``DreamModel``) pick ``LLaDADenoiser`` / ``DreamDenoiser`` (loaded strictly, in the
checkpoint's dtype unless ``dtype`` is given; their tokenizer through ``load_dllm_tokenizer``);
anything else is MDLM. A diffusion LLM declares its end tokens itself (``eos_id``, from its
config: ``models.dllm``, "End tokens"; LLaDA-Instruct 126081 and ``<|eot_id|>`` 126348, Dream
``<|endoftext|>`` and ``<|im_end|>``); ``load_model`` only appends the end tokens of the
checkpoint's own tokenizer that the config does not name (its ``eos_token`` and the
end-of-turn tokens ``END_OF_TURN`` it has: a model trained here with another tokenizer).
Every entry point (``sample``, the method builder, ``AmortizedProposalModule``, the benchmarks)
loads models through these.

Every file is read through ``models.files`` (``read_json``, ``read_safetensors``,
``read_checkpoint``, re-exported here): pickles are only ever unpickled with
``torch.load(weights_only=True)`` and every failure names the file. ``ASSETS`` and the ``EMBEDDED*`` folders are the one definition of the packaged models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .files import read_checkpoint, read_json, read_safetensors

__all__ = [
    "ASSETS",
    "DLLM_KINDS",
    "EMBEDDED",
    "EMBEDDED_ADAPTER",
    "EMBEDDED_TOXICITY_REWARD",
    "EMBEDDED_REWARD",
    "load_denoiser",
    "load_model",
    "model_kind",
    "read_checkpoint",
    "read_json",
    "read_safetensors",
    "resolve_adapter",
    "resolve_checkpoint",
]

#: the models packaged with lightning_smc
ASSETS = Path(__file__).resolve().parent.parent / "assets"
#: the embedded base model (MDLM on Shakespeare) and its tokenizer
EMBEDDED = ASSETS / "mdlm_tiny"
#: the amortized sentiment proposal (LoRA) of the embedded model (configs/amortized/sentiment_tiny.yaml)
EMBEDDED_ADAPTER = ASSETS / "sentiment_adapter_tiny"
#: the amortized toxicity proposal (LoRA) of the embedded model
#: (configs/amortized/toxicity_tiny_per_state.yaml)
EMBEDDED_TOXICITY_ADAPTER = ASSETS / "toxicity_adapter_tiny"
#: the learned sentiment reward (imitates VADER) on the embedded model's vocabulary
EMBEDDED_REWARD = ASSETS / "sentiment_reward_tiny"
#: the learned toxicity surrogate (imitates ProfanityToxicity), for SMCgrad on toxicity
EMBEDDED_TOXICITY_REWARD = ASSETS / "toxicity_reward_tiny"


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """``"embedded"`` -> the packaged model folder; anything else -> ``Path(name_or_path)``."""
    return EMBEDDED if str(name_or_path) == "embedded" else Path(name_or_path)


def resolve_adapter(name_or_path: str | Path) -> Path:
    """``"embedded"`` -> the packaged sentiment LoRA adapter of the embedded model,
    ``"embedded_toxicity"`` -> its toxicity adapter; else the folder."""
    named = {"embedded": EMBEDDED_ADAPTER, "embedded_toxicity": EMBEDDED_TOXICITY_ADAPTER}
    return named.get(str(name_or_path), Path(name_or_path))


#: ``config.json`` ``model_type`` / ``architectures`` entries of the diffusion LLMs
DLLM_KINDS = {"llada": "llada", "LLaDAModelLM": "llada", "dream": "dream", "DreamModel": "dream"}
#: end-of-turn tokens of the instruct models, appended to ``eos_id`` when the tokenizer has them
#: and the config does not name them
END_OF_TURN = ("<|eot_id|>", "<|im_end|>")


def model_kind(name_or_path: str | Path) -> str:
    """``"llada"``, ``"dream"`` or ``"mdlm"``: the backbone a checkpoint folder's
    ``config.json`` names (``model_type``, else ``architectures``); ``"mdlm"`` for anything else
    (and for a hub id, which is read in the mdlm-owt format)."""
    config_file = resolve_checkpoint(name_or_path) / "config.json"
    if not config_file.is_file():
        return "mdlm"
    config = read_json(config_file)
    names = [str(config.get("model_type", ""))] + list(config.get("architectures") or [])
    for name in names:
        kind = DLLM_KINDS.get(name) or DLLM_KINDS.get(name.lower())
        if kind is not None:
            return kind
    return "mdlm"


def load_denoiser(name_or_path: str | Path, dtype: Any = None) -> Any:
    """The denoiser of ``name_or_path`` (``"embedded"``, a ``save_pretrained`` folder of MDLM,
    LLaDA or Dream, or a hub id in the mdlm-owt format), in eval mode. ``dtype`` (a
    ``torch.dtype`` or its name, e.g. ``"bfloat16"``): the diffusion LLMs' weights (default:
    the checkpoint's)."""
    from .mdlm import MDLMDenoiser

    path = resolve_checkpoint(name_or_path)
    if path.is_dir() and not (path / "config.json").is_file():
        hint = (
            " (the embedded model ships with the package; reinstall it)" if path == EMBEDDED else ""
        )
        raise FileNotFoundError(f"checkpoint {path}: no config.json there{hint}")
    kind = model_kind(path)
    if kind == "mdlm":
        if dtype is not None:
            raise ValueError(f"checkpoint {path}: dtype={dtype!r} is for LLaDA / Dream folders")
        return MDLMDenoiser.from_pretrained(path).eval()
    return _load_dllm(path, kind, dtype)


def _load_dllm(path: Path, kind: str, dtype: Any) -> Any:
    import torch

    from .dream import DreamDenoiser
    from .llada import LLaDADenoiser

    kwargs = {}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if not isinstance(kwargs["dtype"], torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype name (e.g. 'bfloat16')")
    denoiser = {"llada": LLaDADenoiser, "dream": DreamDenoiser}[kind].from_pretrained(
        path, **kwargs
    )
    return denoiser.eval()  # (its eos_id comes from its config)


def load_model(name_or_path: str | Path, tokenizer: str | Path | None = None, dtype: Any = None):
    """``(denoiser, tokenizer spec)`` of ``name_or_path``: ``"embedded"`` or a ``save_pretrained``
    folder with its tokenizer (MDLM, LLaDA or Dream, see the module docstring), or (with
    ``tokenizer``, e.g. ``"gpt2"``) any checkpoint the denoiser loads, such as a hub id in the
    mdlm-owt format. The vocabularies must agree."""
    from .tokenizer import load_tokenizer

    path = resolve_checkpoint(name_or_path)
    if tokenizer is None and not path.is_dir():
        raise FileNotFoundError(
            f"model {name_or_path!r} is not a local checkpoint folder; a hub id needs its "
            "tokenizer named (tokenizer: gpt2)"
        )
    denoiser = load_denoiser(path, dtype)
    if model_kind(path) != "mdlm":
        return denoiser, _dllm_tokenizer(denoiser, path if tokenizer is None else tokenizer)
    spec = load_tokenizer(path if tokenizer is None else tokenizer)
    if spec.vocab_size != denoiser.vocab_size or spec.mask_id != denoiser.mask_id:
        raise ValueError(
            f"checkpoint {path}: tokenizer vocabulary ({spec.vocab_size}, mask {spec.mask_id}) "
            f"does not match the model ({denoiser.vocab_size}, mask {denoiser.mask_id})"
        )
    return denoiser, spec


def _dllm_tokenizer(denoiser: Any, path: str | Path):
    """The ``TokenizerSpec`` of a diffusion LLM's tokenizer folder (the model's vocabulary and
    mask id; the tokenizer's ids must fit in it); the tokenizer's end tokens that the
    denoiser's config does not name are appended to its ``eos_id``."""
    from .dllm import load_dllm_tokenizer
    from .tokenizer import TokenizerSpec

    tok = load_dllm_tokenizer(path)
    V, mask_id = denoiser.vocab_size, denoiser.mask_id
    if len(tok) > V or (tok.mask_token_id is not None and tok.mask_token_id != mask_id):
        raise ValueError(
            f"tokenizer {path}: {len(tok)} ids (mask {tok.mask_token_id}) do not fit the model's "
            f"vocabulary ({V} ids, mask {mask_id}); use the tokenizer saved with the model"
        )
    ends = list(denoiser.eos_id)
    for token in (tok.eos_token, *END_OF_TURN):
        i = tok.convert_tokens_to_ids(token) if token else None
        if isinstance(i, int) and i != tok.unk_token_id and i not in ends and i != mask_id:
            ends.append(i)
    denoiser.eos_id = tuple(ends)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return TokenizerSpec(tok, V, mask_id, pad if pad is not None else -1)
