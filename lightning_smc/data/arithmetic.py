"""Synthetic multi-step arithmetic word problems with a checkable ``#### n`` answer line.

A GSM8K-shaped task small enough for a tiny diffusion LLM trained on CPU (the embedded
reasoning demo, ``configs/pretrain/llada_arith_tiny.yaml``). A problem is a start count and
2-3 signed changes, rendered as

    prompt: "Tom has 37 apples. He buys 5 more, loses 8 and finds 2 more. How many apples does he have?"
    answer: "37+5=42. 42-8=34. 34+2=36.\\n#### 36"

(one equation per change, then GSM8K's answer line). Every intermediate value stays in
``[0, max_value]``; the start is in ``[0, max_start]``, each change in ``[1, max_change]``.

**Split.** A problem belongs to a split by a hash of its canonical form (the prompt text):
``bucket = sha256(prompt) mod 100``; buckets ``< 10`` are test, ``10 .. 14`` validation, the
rest train. So train and test never share a problem, whatever the seeds. The test set is the
first ``num_test`` distinct test-bucket problems drawn from ``test_seed`` (fixed, default 512).

**Tokenizer.** ``arithmetic_tokenizer()``: a tiny word-level ``PreTrainedTokenizerFast``
whose pieces are words with their leading space (``" apples"``), single digits (a number's
first digit carries the space: ``" 3"``, ``"7"``), punctuation, ``"\\n"`` and ``"####"``;
the decoder concatenates pieces, so ``decode(encode(text)) == text``. Ids follow the
project's convention: ``<|endoftext|>`` 0 (EOS, also BOS), ``<|pad|>`` 1, the pieces in sorted
order, ``<|mask|>`` last (``mask_id = vocab_size - 1``). ``save_pretrained`` output loads with
``AutoTokenizer.from_pretrained(folder)``. Text outside the vocabulary is an error.

**Rows** (``ArithmeticDataModule``), as LLaDA's SFT lays them out: the prompt left-padded with
``<|pad|>`` to ``prompt_length`` (the padding is ordinary visible context, at training and at
sampling time, so every response starts at position ``prompt_length``), then the answer and
EOS up to ``gen_length`` (the model learns to stop by generating EOS). Batches are
``{"input_ids": [B, prompt_length + gen_length], "prompt_lengths": [B]}``::

    dm = ArithmeticDataModule(batch_size=64)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    problems = dm.test_problems           # 512 fixed Problem objects, never seen in training
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from functools import cached_property
from itertools import product

import lightning as L
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerFast

from ..models.tokenizer import EOS_TOKEN, MASK_TOKEN, PAD_TOKEN
from .packing import EpochShuffleSampler, ResumableDataLoader

__all__ = [
    "ArithmeticDataModule",
    "Problem",
    "arithmetic_tokenizer",
    "draw_problem",
    "encode_text",
    "split_of",
    "problem_set",
]

NAMES = (
    ("Tom", "he"),
    ("Sam", "he"),
    ("Ben", "he"),
    ("Ann", "she"),
    ("Mia", "she"),
    ("Eva", "she"),
)
OBJECTS = ("apples", "pens", "cards", "eggs", "coins", "books")
GAINS = ("buys {n} more", "finds {n} more", "gets {n} more")
LOSSES = ("gives away {n}", "loses {n}", "sells {n}")
TEST_BUCKETS, VAL_BUCKETS = range(0, 10), range(10, 15)
#: pieces of the word-level tokenizer: ####, a word with its space, a digit (with a space), \n, a symbol
PIECE = r"####| ?[A-Za-z]+| ?[0-9]|\n|[^\sA-Za-z0-9]"


@dataclass(frozen=True)
class Problem:
    """``name`` has ``start`` ``obj``; ``changes[i]`` (signed) with the phrase ``verbs[i]``."""

    name: str
    obj: str
    start: int
    changes: tuple[int, ...]
    verbs: tuple[str, ...]

    @property
    def values(self) -> list[int]:
        """The running count: ``start`` then after each change."""
        values = [self.start]
        for c in self.changes:
            values.append(values[-1] + c)
        return values

    @property
    def answer_value(self) -> int:
        return self.values[-1]

    @property
    def prompt(self) -> str:
        pronoun = dict(NAMES)[self.name]
        steps = [v.format(n=abs(c)) for v, c in zip(self.verbs, self.changes, strict=True)]
        said = ", ".join(steps[:-1]) + " and " + steps[-1]
        return (
            f"{self.name} has {self.start} {self.obj}. {pronoun.capitalize()} {said}. "
            f"How many {self.obj} does {pronoun} have?"
        )

    @property
    def answer(self) -> str:
        v = self.values
        lines = [
            f"{a}{'+' if c > 0 else '-'}{abs(c)}={b}."
            for a, c, b in zip(v, self.changes, v[1:], strict=False)
        ]
        return " ".join(lines) + f"\n#### {self.answer_value}"


def split_of(problem: Problem) -> str:
    """``"test"``, ``"val"`` or ``"train"`` from a hash of the canonical problem (its prompt)."""
    bucket = int(hashlib.sha256(problem.prompt.encode()).hexdigest()[:8], 16) % 100
    return "test" if bucket in TEST_BUCKETS else "val" if bucket in VAL_BUCKETS else "train"


def draw_problem(
    rng: random.Random,
    max_start: int = 50,
    max_change: int = 9,
    max_value: int = 99,
    ops: tuple[int, int] = (2, 3),
) -> Problem:
    """One problem from ``rng``: uniform name, object and number of changes in ``ops``; each
    change a uniform sign and size in ``[1, max_change]``, its sign flipped when the count
    would leave ``[0, max_value]``."""
    name, _ = rng.choice(NAMES)
    obj, count = rng.choice(OBJECTS), rng.randint(0, max_start)
    changes, verbs = [], []
    for _ in range(rng.randint(*ops)):
        c = rng.randint(1, max_change) * rng.choice((1, -1))
        if not 0 <= count + c <= max_value:
            c = -c
        count += c
        changes.append(c)
        verbs.append(rng.choice(GAINS if c > 0 else LOSSES))
    return Problem(name, obj, count - sum(changes), tuple(changes), tuple(verbs))


def _check_task(max_start: int, max_change: int, max_value: int, ops: tuple[int, int]) -> None:
    checks = [
        (0 <= max_start <= max_value, f"max_start={max_start} must lie in [0, max_value]"),
        (
            max_change >= 1 and 2 * max_change <= max_value,
            f"max_change={max_change} must be >= 1 and <= max_value / 2 (={max_value // 2})",
        ),
        (max_value <= 99, f"max_value={max_value} must be <= 99 (two-digit numbers)"),
        (
            len(ops) == 2 and 1 <= ops[0] <= ops[1] <= 3,
            f"ops={tuple(ops)} must be (min, max) changes with 1 <= min <= max <= 3",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _problems_of(split: str, seed: int, start: int = 0, **task):
    """Problems of ``split`` in the order drawn from ``(seed, attempt)``-seeded generators."""
    attempt = start
    while True:
        problem = draw_problem(random.Random(f"{seed}:{attempt}"), **task)
        attempt += 1
        if split_of(problem) == split:
            yield problem


def problem_set(num: int = 512, seed: int = 1234, split: str = "test", **task) -> list[Problem]:
    """The first ``num`` distinct problems of ``split`` drawn from ``seed`` (a fixed set)."""
    seen, out = set(), []
    for problem in _problems_of(split, seed, **task):
        if problem.prompt not in seen:
            seen.add(problem.prompt)
            out.append(problem)
        if len(out) == num:
            return out
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------ tokenizer
def _vocabulary() -> list[str]:
    """Every piece a problem or answer can contain (words of the templates, digits, symbols)."""
    texts = [
        Problem(n, o, 10, (1, -1, 1), (g, loss, g2)).prompt
        for (n, _), o, g, loss, g2 in product(NAMES, OBJECTS, GAINS, LOSSES, GAINS[::-1])
    ]
    texts += [f"{d} {d}+-=.\n#### {d}" for d in range(10)]
    return sorted({p for text in texts for p in re.findall(PIECE, text)})


def arithmetic_tokenizer() -> PreTrainedTokenizerFast:
    """The task's word-level tokenizer (see the module docstring), built deterministically."""
    pieces = [EOS_TOKEN, PAD_TOKEN, *_vocabulary(), MASK_TOKEN]
    model = models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token=None)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([EOS_TOKEN, PAD_TOKEN, MASK_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def encode_text(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Ids of ``text``; ``ValueError`` naming the text when a piece is outside the vocabulary."""
    pieces = re.findall(PIECE, text)
    if "".join(pieces) != text:
        raise ValueError(f"text {text!r} has characters the arithmetic tokenizer cannot encode")
    vocab = tokenizer.get_vocab()
    unknown = sorted({p for p in pieces if p not in vocab})
    if unknown:
        raise ValueError(f"text {text!r} has pieces outside the arithmetic vocabulary: {unknown}")
    return [vocab[p] for p in pieces]


# ------------------------------------------------------------------------------ rows
class ProblemRows(Dataset):
    """Fixed-length SFT rows (see the module docstring) of a list of problems or, for the
    train split, of the ``index``-th train problem drawn from ``(seed, index)`` on the fly."""

    def __init__(self, module: ArithmeticDataModule, problems: list[Problem] | None, size: int):
        self.module, self.problems, self.size = module, problems, size

    def __len__(self) -> int:
        return self.size

    def problem(self, index: int) -> Problem:
        if self.problems is not None:
            return self.problems[index]
        m = self.module
        return next(_problems_of("train", m.seed, start=index * 1000, **m.task))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, P = self.module.encode_row(self.problem(index))
        return {"input_ids": ids, "prompt_lengths": torch.tensor(P)}


class ArithmeticDataModule(L.LightningDataModule):
    """SFT rows of arithmetic word problems (see the module docstring).

    Args:
        prompt_length: tokens of the left-padded prompt region (every prompt must fit).
        gen_length: tokens of the response region (answer + at least one EOS).
        batch_size: rows per batch.
        num_train: train rows per epoch (drawn on the fly from ``(seed, index)``).
        num_val: validation problems (their own hash buckets).
        num_test: fixed test problems (``test_problems``, see ``problem_set``), drawn from ``test_seed``.
        max_start, max_change, max_value, ops: the task (see ``draw_problem``).
        seed, test_seed: train / val draws and the epoch order; the test set.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        prompt_length: int = 32,
        gen_length: int = 32,
        batch_size: int = 64,
        num_train: int = 500_000,
        num_val: int = 256,
        num_test: int = 512,
        max_start: int = 50,
        max_change: int = 9,
        max_value: int = 99,
        ops: tuple[int, int] = (2, 3),
        seed: int = 0,
        test_seed: int = 1234,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        _check_task(max_start, max_change, max_value, tuple(ops))
        for value, name in ((batch_size, "batch_size"), (num_train, "num_train")):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if num_val < 1 or num_test < 1:
            raise ValueError(f"num_val={num_val} and num_test={num_test} must be >= 1")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        self.prompt_length, self.gen_length = prompt_length, gen_length
        self.batch_size, self.num_train, self.num_val, self.num_test = (
            batch_size,
            num_train,
            num_val,
            num_test,
        )
        self.task = {
            "max_start": max_start,
            "max_change": max_change,
            "max_value": max_value,
            "ops": tuple(ops),
        }
        self.seed, self.test_seed, self.num_workers = seed, test_seed, num_workers
        self._check_lengths()
        self.train_set: ProblemRows | None = None
        self.val_set: ProblemRows | None = None

    # ---- tokenizer ------------------------------------------------------------------------
    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        return arithmetic_tokenizer()

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def mask_id(self) -> int:
        return self.tokenizer.mask_token_id

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def seq_len(self) -> int:
        return self.prompt_length + self.gen_length

    # ---- rows -----------------------------------------------------------------------------
    def _check_lengths(self) -> None:
        """Every problem of this task fits: the longest prompt (2-digit numbers, the wordiest
        phrases) and the longest answer (all values 2-digit, most changes)."""
        k, big = self.task["ops"][1], min(self.task["max_value"], 99)
        longest_prompt = max(
            len(encode_text(self.tokenizer, Problem("Tom", "apples", big, (-9,) * k, v).prompt))
            for v in product(GAINS + LOSSES, repeat=k)
        )
        longest_answer = len(re.findall(PIECE, " ".join(["99+9=99."] * k) + "\n#### 99"))
        if longest_prompt > self.prompt_length:
            raise ValueError(
                f"prompt_length={self.prompt_length} is shorter than this task's longest prompt "
                f"({longest_prompt} tokens): set prompt_length >= {longest_prompt}"
            )
        if longest_answer + 1 > self.gen_length:
            raise ValueError(
                f"gen_length={self.gen_length} does not hold this task's longest answer "
                f"({longest_answer} tokens) plus an EOS: set gen_length >= {longest_answer + 1}"
            )

    def prompt_ids(self, problem: Problem) -> torch.Tensor:
        """``[prompt_length]``: the prompt left-padded with ``<|pad|>``."""
        ids = encode_text(self.tokenizer, problem.prompt)
        return torch.tensor([self.pad_id] * (self.prompt_length - len(ids)) + ids)

    def encode_row(self, problem: Problem) -> tuple[torch.Tensor, int]:
        """``(ids [seq_len], prompt_length)``: padded prompt, answer, EOS to the end."""
        answer = encode_text(self.tokenizer, problem.answer)
        tail = answer + [self.eos_id] * (self.gen_length - len(answer))
        return torch.cat([self.prompt_ids(problem), torch.tensor(tail)]), self.prompt_length

    @cached_property
    def test_problems(self) -> list[Problem]:
        return problem_set(self.num_test, self.test_seed, **self.task)

    def setup(self, stage: str | None = None) -> None:
        val = problem_set(self.num_val, self.test_seed, split="val", **self.task)
        self.train_set = ProblemRows(self, None, self.num_train)
        self.val_set = ProblemRows(self, val, len(val))

    def check_compatible(
        self, vocab_size: int, mask_id: int | None = None, max_len: int | None = None
    ) -> None:
        """``ValueError`` unless a model with this vocabulary reads these rows."""
        if vocab_size != self.vocab_size or (mask_id is not None and mask_id != self.mask_id):
            raise ValueError(
                f"model vocabulary mismatch: the arithmetic tokenizer has {self.vocab_size} ids "
                f"(mask_id={self.mask_id}) but the model was built with vocab_size={vocab_size} "
                f"(mask_id={mask_id}); build it with vocab_size={self.vocab_size} and "
                f"mask_token_id={self.mask_id}"
            )
        if max_len is not None and self.seq_len > max_len:
            raise ValueError(f"prompt_length + gen_length={self.seq_len} exceeds {max_len}")

    def train_dataloader(self) -> DataLoader:
        """Full batches in a ``(seed, epoch)``-seeded order, resumable mid-epoch."""
        dataset = self._require(self.train_set)
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(dataset, seed=self.seed),
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self._require(self.val_set), batch_size=self.batch_size, num_workers=self.num_workers
        )

    @staticmethod
    def _require(dataset: Dataset | None) -> Dataset:
        if dataset is None:
            raise RuntimeError("call setup() before asking for data")
        return dataset
