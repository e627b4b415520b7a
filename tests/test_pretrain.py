"""``MDLMPretraining`` with ``TextDataModule``: learning, exact mid-epoch resume, EMA, bad inputs.

Everything runs on CPU with a tiny DiT (hidden 32, one block) on four Shakespeare works packed
into 32-token rows with a 300-id BPE (2161 training batches of 4 per epoch).
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import safetensors.torch
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_smc.data import TextDataModule
from lightning_smc.data.packing import EpochShuffleSampler, PackedSequences, ResumableDataLoader
from lightning_smc.models import MDLMDenoiser
from lightning_smc.models.loading import read_checkpoint
from lightning_smc.modules import MDLMPretraining

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN, BATCH = 32, 4
TINY = dict(hidden_dim=32, n_blocks=1, n_heads=2, cond_dim=16, model_length=SEQ_LEN)
QUIET = dict(
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    limit_val_batches=0,
    num_sanity_val_steps=0,
)


def data_args(tokenizer_dir) -> dict:
    return dict(
        corpus="shakespeare",
        max_documents=4,
        vocab_size=300,
        seq_len=SEQ_LEN,
        batch_size=BATCH,
        tokenizer_dir=str(tokenizer_dir),
    )


@pytest.fixture(autouse=True)
def _torch_threads():
    """One thread (overrides conftest's two): a tiny model's ops are too small to split, and on
    a busy machine two spinning OpenMP threads made a step ~100x slower (0.9 s vs 5 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dm(tmp_path_factory) -> TextDataModule:
    module = TextDataModule(**data_args(tmp_path_factory.mktemp("pretrain") / "tok"))
    module.setup()
    return module


def tiny_model(dm, init: int = 0, lr: float = 3e-3, warmup_steps: int = 5, **denoiser):
    """The tiny MDLM (dropout 0.1, the default) initialised from ``torch.manual_seed(init)``."""
    torch.manual_seed(init)
    fields = {**TINY, "vocab_size": dm.vocab_size, "mask_id": dm.mask_id, **denoiser}
    return MDLMPretraining(MDLMDenoiser(**fields), lr=lr, warmup_steps=warmup_steps, seed=0)


class Recorder(Callback):
    """Training losses per step, and the raw (non-averaged) weights after the last step."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.raw: dict[str, torch.Tensor] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        if trainer.global_step == trainer.max_steps:
            self.raw = {k: v.detach().clone() for k, v in pl_module.denoiser.state_dict().items()}


def denoiser_state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.denoiser.state_dict().items()}


def ema_state(ema: EMAWeightAveraging) -> dict[str, torch.Tensor]:
    return denoiser_state(ema._average_model.module)


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ---- the train loader ---------------------------------------------------------------------
def test_resumable_loader_continues_the_interrupted_epoch():
    rows = torch.arange(40 * 3).reshape(40, 3).numpy()
    data = PackedSequences(rows)

    def loader():
        sampler = EpochShuffleSampler(data, seed=7)
        return ResumableDataLoader(data, batch_size=4, sampler=sampler, drop_last=True)

    def first_ids(batches):
        return [b["input_ids"][:, 0].tolist() for b in batches]

    full = loader()
    full.sampler.set_epoch(3)
    epoch3 = first_ids(full)
    assert len(epoch3) == len(full) == 10
    assert sorted(sum(epoch3, [])) == list(range(0, 120, 3))  # a permutation of all rows
    other = loader()
    other.sampler.set_epoch(4)
    assert first_ids(other) != epoch3  # a new order per epoch ...
    again = loader()
    again.sampler.set_epoch(3)
    assert first_ids(again) == epoch3  # ... the same on every run

    interrupted = loader()
    interrupted.sampler.set_epoch(3)
    it = iter(interrupted)
    head = first_ids([next(it) for _ in range(6)])
    state = interrupted.state_dict()
    assert state == {"epoch": 3, "batches": 6}

    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(3)
    assert head + first_ids(resumed) == epoch3
    assert first_ids(resumed) == epoch3  # the skip applies to one pass only

    next_epoch = loader()  # a checkpoint taken in epoch 3, resumed into epoch 4: no skip
    next_epoch.load_state_dict(state)
    next_epoch.sampler.set_epoch(4)
    assert len(first_ids(next_epoch)) == 10


# ---- 1. learning --------------------------------------------------------------------------
def test_loss_decreases_from_the_uniform_model(dm):
    steps, head, tail = 100, 10, 40
    recorder = Recorder()
    trainer = L.Trainer(max_steps=steps, callbacks=[recorder], enable_checkpointing=False, **QUIET)
    trainer.fit(tiny_model(dm, lr=1e-3, warmup_steps=20), datamodule=dm)
    losses = torch.tensor(recorder.losses, dtype=torch.float64)
    assert len(losses) == steps and torch.isfinite(losses).all()
    first, last = losses[:head], losses[-tail:]
    # MDLM zero-initialises the output layer, so the model starts uniform over the V - 1
    # non-mask ids: log(V - 1) nats per masked token, and E_t[w(t) P(masked | t)] = 1 - eps, so
    # the expected loss per position starts at ~log(V - 1). One step's loss is noisy (random t
    # weighted by 1/t, 128 tokens: s.d. ~0.7 nats), so the bounds are in standard errors of
    # the window means, estimated from the windows themselves (3 s.e.: one-sided p ~0.001).
    uniform = math.log(dm.vocab_size - 1)
    se_first, se_last = math.sqrt(first.var() / head), math.sqrt(last.var() / tail)
    se_diff = math.hypot(se_first, se_last)
    print(
        f"log(V-1)={uniform:.3f} step 0: {losses[0]:.3f} first {head}: {first.mean():.3f}"
        f"±{se_first:.3f} last {tail}: {last.mean():.3f}±{se_last:.3f} (mean±s.e.)"
    )
    assert abs(float(first.mean()) - uniform) < 3 * se_first  # still ~uniform in warm-up
    assert float(first.mean() - last.mean()) > 3 * se_diff
    assert float(last.mean()) < uniform - 3 * se_last


# ---- 2. exact mid-epoch resume ------------------------------------------------------------
def run_with_resume(dm, tmp_path, total: int, split: int, limit_train_batches=None):
    """(uninterrupted, resumed) = ((raw, ema, after_fit), ...) weights after ``total`` steps.

    The uninterrupted run also writes a checkpoint after ``split`` steps (mid-epoch), from which
    a new Trainer with a new model and a new EMA callback continues to ``total`` steps.
    """
    limits = {} if limit_train_batches is None else {"limit_train_batches": limit_train_batches}
    ckpt = ModelCheckpoint(
        dirpath=tmp_path, filename="{step}", every_n_train_steps=split, save_top_k=-1
    )
    runs = []
    for resume in (False, True):
        recorder, ema = Recorder(), EMAWeightAveraging(decay=0.9)
        callbacks = [ema, recorder] + ([] if resume else [ckpt])
        trainer = L.Trainer(
            max_steps=total,
            callbacks=callbacks,
            enable_checkpointing=not resume,
            gradient_clip_val=1.0,
            **limits,
            **QUIET,
        )
        model = tiny_model(dm, init=int(resume))  # the checkpoint overrides the init
        path = str(tmp_path / f"step={split}.ckpt") if resume else None
        trainer.fit(model, datamodule=dm, ckpt_path=path)
        assert trainer.global_step == total and recorder.raw is not None
        runs.append((recorder.raw, ema_state(ema), denoiser_state(model), recorder.losses))
    return runs


@pytest.mark.parametrize(
    "total, split, limit",
    [(8, 3, None), (9, 5, 3)],
    ids=["mid-epoch-0", "mid-epoch-1-of-3-batch-epochs"],
)
def test_mid_epoch_resume_is_exact(dm, tmp_path, total, split, limit):
    (raw, ema, final, losses), (raw_r, ema_r, final_r, losses_r) = run_with_resume(
        dm, tmp_path, total, split, limit
    )
    print(
        f"max |raw diff|={max_abs_diff(raw, raw_r):.3g} |ema diff|={max_abs_diff(ema, ema_r):.3g}"
    )
    assert losses[split:] == losses_r  # the same batches, t and masks at every step
    assert all(torch.equal(raw[k], raw_r[k]) for k in raw)
    assert all(torch.equal(ema[k], ema_r[k]) for k in ema)
    assert all(torch.equal(final[k], final_r[k]) for k in final)
    assert max_abs_diff(raw, ema) > 1e-4  # the EMA is a different set of weights


class PlainShuffleData(TextDataModule):
    """The loader before this module's fix: ``shuffle=True``, no state."""

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)


def test_resume_with_a_plain_shuffled_loader_diverges(dm, tmp_path):
    """The check above can fail: a stateless loader restarts the epoch on resume."""
    plain = PlainShuffleData(**dict(dm.hparams))
    plain.setup()
    (raw, *_), (raw_r, *_) = run_with_resume(plain, tmp_path, total=8, split=3)
    assert max_abs_diff(raw, raw_r) > 1e-4


# ---- 3. EMA weights end up in the model (and in the HF export) ----------------------------
def test_fit_leaves_the_ema_weights_in_the_denoiser(dm):
    recorder, ema = Recorder(), EMAWeightAveraging(decay=0.9)
    trainer = L.Trainer(max_steps=6, callbacks=[ema, recorder], enable_checkpointing=False, **QUIET)
    model = tiny_model(dm)
    trainer.fit(model, datamodule=dm)
    final, averaged = denoiser_state(model), ema_state(ema)
    assert max_abs_diff(final, averaged) == 0.0
    assert max_abs_diff(final, recorder.raw) > 1e-4


def test_cli_exports_the_ema_weights(dm, tmp_path, monkeypatch):
    from lightning_smc.fit import main

    monkeypatch.chdir(tmp_path)
    sizes = [f"--model.init_args.denoiser.init_args.{k}={v}" for k, v in TINY.items()]
    cli = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/pretrain/mdlm_tiny.yaml"),
            "--trainer.logger=false",
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=4",  # last.ckpt is written after this validation,
            "--trainer.limit_val_batches=1",  # before EMAWeightAveraging.on_train_end
            "--trainer.default_root_dir=run",
            *[f"--data.init_args.{k}={v}" for k, v in data_args(dm.tokenizer_dir).items()],
            "--model.init_args.denoiser.init_args.vocab_size=300",
            "--model.init_args.warmup_steps=0",  # so that 4 steps move the raw weights
            *sizes,
        ]
    )
    assert cli.trainer.global_step == 4
    exported = safetensors.torch.load_file(str(tmp_path / "run/hf/model.safetensors"))
    ckpt = read_checkpoint(cli.trainer.checkpoint_callback.last_model_path)  # weights only

    def denoiser_part(state):
        return {
            k.removeprefix("denoiser."): v for k, v in state.items() if k.startswith("denoiser.")
        }

    # WeightAveraging puts the average into "state_dict" and the raw weights beside it. (A
    # last.ckpt first written by ModelCheckpoint.on_train_end would hold the average in both:
    # the callback has already copied it into the model by then.)
    assert max_abs_diff(exported, denoiser_part(ckpt["state_dict"])) == 0.0
    assert max_abs_diff(exported, denoiser_part(ckpt["current_model_state"])) > 1e-4


# ---- 4. bad inputs ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"lr": 0.0}, "lr="),
        ({"lr": -1e-3}, "lr="),
        ({"lr": float("nan")}, "lr="),
        ({"warmup_steps": -1}, "warmup_steps="),
        ({"betas": (0.9, 1.0)}, "betas="),
        ({"eps": 0.0}, "eps="),
    ],
)
def test_bad_hyperparameters_are_named(kwargs, field):
    denoiser = MDLMDenoiser(vocab_size=20, **TINY)
    with pytest.raises(ValueError, match=field):
        MDLMPretraining(denoiser, **kwargs)


@pytest.mark.parametrize(
    "denoiser, field",
    [
        ({"vocab_size": 200}, "vocab_size"),  # logits cannot cover the tokenizer's ids
        ({"vocab_size": 300, "mask_id": 0}, "mask_id"),  # same size, another mask token
        ({"model_length": 16}, "seq_len=32"),  # rows longer than the model's positions
    ],
    ids=["vocab_size", "mask_id", "model_length"],
)
def test_datamodule_that_does_not_fit_the_denoiser_fails_at_setup(dm, denoiser, field):
    fields = {**TINY, "vocab_size": dm.vocab_size, **denoiser}
    fields.setdefault("mask_id", fields["vocab_size"] - 1)
    model = MDLMPretraining(MDLMDenoiser(**fields))
    trainer = L.Trainer(max_steps=1, enable_checkpointing=False, **QUIET)
    with pytest.raises(ValueError, match=field):
        trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 0
