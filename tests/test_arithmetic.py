"""The arithmetic word-problem task (generator, split, tokenizer, rows) and the SFT loss."""

import random
import re

import pytest
import torch
from transformers import AutoTokenizer

from lightning_smc.data.arithmetic import (
    ArithmeticDataModule,
    Problem,
    arithmetic_tokenizer,
    draw_problem,
    encode_text,
    problem_set,
    split_of,
)
from lightning_smc.diffusion import get_schedule
from lightning_smc.models.llada import LLaDAConfig, LLaDADenoiser, LLaDAModelLM
from lightning_smc.modules.pretrain import masked_diffusion_loss
from lightning_smc.modules.sft import MaskedSFT, response_mask

EQUATION = re.compile(r"(\d+)([+-])(\d+)=(\d+)\.")


def _recompute(problem: Problem) -> int:
    """The answer from the prompt's words alone (gain verbs add, loss verbs subtract)."""
    text = problem.prompt
    start = int(re.search(r"has (\d+)", text).group(1))
    total = start
    for verb, n in re.findall(r"(buys|finds|gets|gives away|loses|sells) (\d+)", text):
        total += int(n) if verb in ("buys", "finds", "gets") else -int(n)
    return total


def test_generator_is_seeded_and_answers_are_correct():
    a = [draw_problem(random.Random(f"7:{i}")) for i in range(300)]
    b = [draw_problem(random.Random(f"7:{i}")) for i in range(300)]
    assert a == b
    assert len({p.prompt for p in a}) > 250  # varied
    for p in a:
        assert 2 <= len(p.changes) <= 3 and all(0 <= v <= 99 for v in p.values)
        assert p.answer_value == _recompute(p)
        equations = EQUATION.findall(p.answer)
        assert len(equations) == len(p.changes)
        for x, op, y, z in equations:  # every reasoning line is true arithmetic
            assert int(z) == (int(x) + int(y) if op == "+" else int(x) - int(y))
        assert p.answer.endswith(f"\n#### {p.answer_value}")


def test_train_and_test_never_overlap():
    test = problem_set(512)
    assert len(test) == 512 and len({p.prompt for p in test}) == 512
    assert test == problem_set(512)  # fixed
    assert all(split_of(p) == "test" for p in test)
    dm = ArithmeticDataModule(num_train=2000, batch_size=8)
    dm.setup()
    train = {dm.train_set.problem(i).prompt for i in range(2000)}
    val = {p.prompt for p in dm.val_set.problems}
    assert not train & {p.prompt for p in test}
    assert not val & {p.prompt for p in test} and not train & val
    assert all(split_of(dm.train_set.problem(i)) == "train" for i in range(200))


def test_tokenizer_round_trip_and_autotokenizer(tmp_path):
    tok = arithmetic_tokenizer()
    assert (tok.eos_token_id, tok.pad_token_id, tok.mask_token_id) == (0, 1, len(tok) - 1)
    for i in range(50):
        p = draw_problem(random.Random(i))
        text = p.prompt + p.answer
        ids = encode_text(tok, text)
        assert tok(text)["input_ids"] == ids and tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.mask_token_id == tok.mask_token_id and loaded.decode(ids) == text
    with pytest.raises(ValueError, match="outside the arithmetic vocabulary"):
        encode_text(tok, "Zed has 3 apples.")


def test_rows_are_padded_prompt_answer_eos():
    dm = ArithmeticDataModule(prompt_length=32, gen_length=32, batch_size=4, num_train=64)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 64) and batch["prompt_lengths"].tolist() == [32] * 4
    row = batch["input_ids"][0]
    assert row[31] != dm.pad_id and row[-1] == dm.eos_id and not (row == dm.mask_id).any()
    text = dm.tokenizer.decode(row[32:], skip_special_tokens=True)
    assert re.fullmatch(r"(\d+[+-]\d+=\d+\. ?)+\n#### \d+", text)
    with pytest.raises(ValueError, match="gen_length"):
        ArithmeticDataModule(gen_length=10)
    with pytest.raises(ValueError, match="prompt_length"):
        ArithmeticDataModule(prompt_length=10)


def _tiny_llada(vocab_size: int, mask_id: int) -> LLaDADenoiser:
    torch.manual_seed(0)
    config = LLaDAConfig(
        d_model=32,
        n_heads=2,
        n_kv_heads=2,
        n_layers=1,
        mlp_hidden_size=64,
        vocab_size=vocab_size,
        embedding_size=vocab_size,
        mask_token_id=mask_id,
        rope_theta=10000.0,
    )
    return LLaDADenoiser(LLaDAModelLM(config)).float()


class PositionDenoiser(torch.nn.Module):
    """Logits that depend on the position only (not on x_t): a change of a target token
    changes the loss only through the target."""

    def __init__(self, vocab_size: int, mask_id: int, length: int):
        super().__init__()
        self.vocab_size, self.mask_id = vocab_size, mask_id
        g = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(length, vocab_size, generator=g))
        self.inputs = []

    def forward(self, x_t, t=None, cond=None):
        self.inputs.append(x_t.clone())
        return self.table.expand(x_t.shape[0], -1, -1)


def test_sft_loss_only_reads_answer_positions():
    dm = ArithmeticDataModule(batch_size=4, num_train=16)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    denoiser = PositionDenoiser(dm.vocab_size, dm.mask_id, dm.seq_len)
    module = MaskedSFT(denoiser)
    loss = module._nll(batch, torch.Generator().manual_seed(3))
    (x_t,) = denoiser.inputs
    prompt, masked = ~response_mask(batch), x_t == dm.mask_id
    assert torch.equal(x_t[prompt], batch["input_ids"][prompt])  # the prompt stays clean
    assert masked.any() and not (masked & prompt).any()
    # a different prompt token as the target: the same loss
    other = dict(batch, input_ids=batch["input_ids"].clone())
    other["input_ids"][:, 30] = (other["input_ids"][:, 30] + 1) % dm.mask_id
    torch.testing.assert_close(module._nll(other, torch.Generator().manual_seed(3)), loss)
    # a different masked answer token as the target: a different loss (the test can fail)
    row, col = masked.nonzero()[0].tolist()
    other["input_ids"][row, col] = (other["input_ids"][row, col] + 1) % dm.mask_id
    assert module._nll(other, torch.Generator().manual_seed(3))[row] != loss[row]
    # LLaDA's loss: (1/t) * sum over the masked answer tokens / answer length
    g = torch.Generator().manual_seed(3)
    t = 1e-3 + (1 - 1e-3) * ((torch.rand((), generator=g) + torch.arange(4) / 4) % 1.0)
    log_p = torch.log_softmax(denoiser.table, -1).expand(4, -1, -1)
    nll = -log_p.gather(-1, batch["input_ids"][..., None])[..., 0]
    expected = get_schedule("loglinear").loss_weight(t) * torch.where(masked, nll, 0).sum(-1)
    torch.testing.assert_close(loss, expected / response_mask(batch).sum(-1))


def test_mdlm_loss_unchanged_without_maskable():
    denoiser = _tiny_llada(20, 19)
    x0 = torch.randint(0, 19, (3, 12), generator=torch.Generator().manual_seed(0))
    schedule = get_schedule("loglinear")
    a = masked_diffusion_loss(denoiser, x0, schedule, torch.Generator().manual_seed(1))
    everything = torch.ones_like(x0, dtype=torch.bool)
    b = masked_diffusion_loss(
        denoiser, x0, schedule, torch.Generator().manual_seed(1), maskable=everything
    )
    torch.testing.assert_close(a, b)


def test_sft_refuses_batches_without_prompt_lengths():
    module = MaskedSFT(_tiny_llada(20, 19))
    with pytest.raises(ValueError, match="prompt_lengths"):
        module._nll({"input_ids": torch.zeros(2, 8, dtype=torch.long)}, torch.Generator())


def test_llada_denoiser_save_pretrained_round_trip(tmp_path):
    """What fit exports (``denoiser.save_pretrained``) loads back strictly, weights equal."""
    denoiser = _tiny_llada(20, 19)
    denoiser.save_pretrained(tmp_path)
    loaded = LLaDADenoiser.from_pretrained(tmp_path, dtype=torch.float32)
    assert loaded.mask_id == 19 and loaded.vocab_size == 20
    for (k, a), b in zip(denoiser.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_sft_mid_epoch_resume_is_exact(tmp_path):
    """A run resumed from a mid-epoch checkpoint ends with the uninterrupted run's weights."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    quiet = {
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    every4 = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=4, save_top_k=-1)
    finals = []
    for resume in (False, True):
        dm = ArithmeticDataModule(batch_size=4, num_train=24, seed=5)  # 6 batches per epoch
        trainer = L.Trainer(
            max_steps=9,
            callbacks=[] if resume else [every4],
            enable_checkpointing=not resume,
            **quiet,
        )
        denoiser = _tiny_llada(dm.vocab_size, dm.mask_id)
        if resume:  # another init: the checkpoint must override it
            with torch.no_grad():
                for w in denoiser.parameters():
                    w.add_(torch.randn_like(w))
        module = MaskedSFT(denoiser, lr=1e-2, warmup_steps=2)
        ckpt = str(tmp_path / "step=4.ckpt") if resume else None  # mid-epoch 0 (batch 4 of 6)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
        assert trainer.global_step == 9
        finals.append({k: v.clone() for k, v in denoiser.state_dict().items()})
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
