"""Text metrics: generative perplexity, unigram entropy, Dist-n, and their DDP reduction.

The perplexity arithmetic is checked on a tiny GPT-2 with a word-level tokenizer, both built
here and saved with ``save_pretrained``; the embedded SmolLM2 scorer is checked for a sensible
ordering (English < shuffled English).
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tolerance import rounding_tolerance

from lightning_smc.dist import free_port
from lightning_smc.metrics import (
    DistinctN,
    GenerativePerplexity,
    UnigramEntropy,
    distinct_n,
    load_scorer,
    smollm2_gguf_path,
    unigram_entropy,
)

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "and",
    "looked",
    "out",
    "of",
    "window",
    "a",
    "dog",
    "ran",
]
SENTENCE = "The cat sat on the mat and looked out of the window."


def perplexity_rtol(num_layers: int, vocab_size: int) -> float:
    """Relative tolerance on a perplexity (absolute on its log, the mean NLL) when the scorer's
    float32 forward rounds differently: another batch composition, padding, kernel set or
    thread count, or float32 instead of float64 for the final log-softmax. Each of the
    ``num_layers`` blocks and the head adds one rounded contribution to every logit, of size
    about ``log V``; 4 float32 ulps per contribution (see tests/tolerance.py). The tiny GPT-2
    below (1 layer, V = 15): 2.6e-6; SmolLM2-135M (30 layers, V = 49152): 1.6e-4."""
    return rounding_tolerance(num_layers + 1, math.log(vocab_size), ulps=4)


TINY_RTOL = perplexity_rtol(1, 2 + len(WORDS))  # build_tiny_lm: 1 layer, <unk> <s> + WORDS


def build_tiny_lm(directory: Path, bos: bool = True) -> Path:
    """A 1-layer GPT-2 and a word-level tokenizer (with or without ``<s>``) saved in ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>"] if bos else ["<unk>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>" if bos else None
    )
    torch.manual_seed(0)
    special = 1 if bos else 0
    config = GPT2Config(
        vocab_size=len(vocab),
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=special,
        eos_token_id=special,
    )
    model = GPT2LMHeadModel(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


def nll_by_hand(directory: Path, ids: list[int]) -> torch.Tensor:
    """NLL of each of ``ids[1:]`` given its prefix, from the model's logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    log_probs = torch.log_softmax(logits[:-1], dim=-1)
    return -log_probs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_perplexity_equals_exp_mean_nll_by_hand(tiny_lm):
    lm, tokenizer = load_scorer(str(tiny_lm))
    text = "the cat sat on the mat"
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and len(ids) == 7  # BOS is prepended, every word is scored
    expected = nll_by_hand(tiny_lm, ids)

    metric = GenerativePerplexity(str(tiny_lm))
    metric.update([text])
    assert int(metric.num_tokens) == 6
    # float32 cross-entropy vs a float64 log-softmax of the same logits
    ppl = math.exp(expected.mean().item())
    assert metric.compute().item() == pytest.approx(ppl, rel=TINY_RTOL)
    assert metric.sample_nll([text]).item() == pytest.approx(
        expected.mean().item(), rel=0, abs=TINY_RTOL
    )


def test_token_weighted_aggregation_over_updates(tiny_lm):
    texts = ["the cat", "a dog ran out of the window and looked", "the mat"]
    split = GenerativePerplexity(str(tiny_lm), batch_size=2)
    split.update(texts[:1])
    split.update(texts[1:])
    once = GenerativePerplexity(str(tiny_lm), batch_size=8)
    once.update(texts)
    # batches of 2 and 8 texts (another padding): the forward rounds differently
    assert split.compute().item() == pytest.approx(once.compute().item(), rel=TINY_RTOL)

    # token-weighted, not the mean of per-text NLLs; padding in a batch changes nothing
    per_text = GenerativePerplexity(str(tiny_lm), batch_size=1).sample_nll(texts)
    torch.testing.assert_close(per_text, once.sample_nll(texts), rtol=0, atol=TINY_RTOL)
    counts = torch.tensor([2.0, 9.0, 2.0], dtype=torch.float64)
    weighted = (per_text * counts).sum() / counts.sum()
    assert once.compute().item() == pytest.approx(math.exp(weighted.item()), rel=TINY_RTOL)
    assert once.compute().item() != pytest.approx(math.exp(per_text.mean().item()), rel=1e-3)


def test_empty_texts_truncation_and_no_bos(tiny_lm, tmp_path):
    metric = GenerativePerplexity(str(tiny_lm))
    metric.update(["", "the cat sat"])
    assert (int(metric.num_texts), int(metric.num_skipped), int(metric.num_tokens)) == (1, 1, 3)
    assert math.isfinite(metric.compute().item())
    with pytest.raises(ValueError, match="indices \\[0\\]"):
        metric.sample_nll(["", "the cat"])
    with pytest.raises(ValueError, match="no token was scored"):
        only_empty = GenerativePerplexity(str(tiny_lm))
        only_empty.update([""])
        only_empty.compute()

    long_text = " ".join(WORDS * 3)  # 39 words, beyond the 16 positions of the tiny model
    assert len(metric.encode([long_text])[0]) == 16
    short = GenerativePerplexity(str(tiny_lm), max_length=4)
    short.update([long_text])
    assert int(short.num_tokens) == 3

    no_bos = build_tiny_lm(tmp_path / "no_bos", bos=False)
    plain = GenerativePerplexity(str(no_bos))
    plain.update(["the cat sat", "dog"])  # without BOS the first token is not scored
    assert (int(plain.num_tokens), int(plain.num_skipped)) == (2, 1)


def test_scorer_is_loaded_once_per_process(tiny_lm):
    a, b = GenerativePerplexity(str(tiny_lm)), GenerativePerplexity(str(tiny_lm))
    assert a.scorer[0] is b.scorer[0]
    assert a.clone().scorer[0] is a.scorer[0]
    assert not any(k.startswith("scorer") for k in a.state_dict())  # the LM is not a submodule


def test_unloadable_scorer_names_it(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(OSError, match="no_such_model"):
        GenerativePerplexity(str(missing)).update(["the cat"])
    empty_dir = tmp_path / "empty_model_dir"
    empty_dir.mkdir()
    with pytest.raises(OSError, match="empty_model_dir"):
        GenerativePerplexity(str(empty_dir)).update(["the cat"])


def test_smollm2_prefers_english_to_shuffled_words():
    assert smollm2_gguf_path().is_file()
    words = SENTENCE.rstrip(".").split()
    random.Random(0).shuffle(words)
    shuffled = " ".join(words) + "."
    metric = GenerativePerplexity("smollm2")
    start = time.perf_counter()
    metric.scorer  # noqa: B018  (load, offline)
    load_seconds = time.perf_counter() - start
    nll = metric.sample_nll([SENTENCE, shuffled])
    print(f"SmolLM2 load {load_seconds:.1f} s; perplexity {nll.exp().tolist()}")
    assert torch.isfinite(nll).all()
    assert nll[0] < nll[1]
    metric.update([SENTENCE])
    # the same forward (one text): the same float32 NLL; then a float64 division and exp,
    # an ulp each
    alone = metric.sample_nll([SENTENCE])
    f64 = rounding_tolerance(2, dtype=torch.float64)
    assert metric.compute().item() == pytest.approx(alone[0].exp().item(), rel=f64)
    # alone vs batched with the shuffled text (padded): the forward rounds differently
    lm = metric.scorer[0]
    rtol = perplexity_rtol(lm.config.num_hidden_layers, lm.config.vocab_size)
    assert alone[0].item() == pytest.approx(nll[0].item(), rel=0, abs=rtol)


def test_unigram_entropy_known_values():
    assert unigram_entropy([1, 1, 2, 2]) == pytest.approx(math.log(2))
    assert unigram_entropy(torch.tensor([7, 7, 7])) == 0.0
    assert unigram_entropy(torch.tensor([1, 2, 3, 4])) == pytest.approx(math.log(4))
    assert unigram_entropy(torch.tensor([5, 5, 6, 6, 0, 0]), ignore_ids=[0]) == pytest.approx(
        math.log(2)
    )
    # counts 2, 1, 1 of 4: -(1/2 log 1/2 + 2 * 1/4 log 1/4) = 1.5 log 2
    assert unigram_entropy([3, 3, 1, 2]) == pytest.approx(1.5 * math.log(2))
    assert unigram_entropy("to be or not to be") == pytest.approx(
        unigram_entropy([1, 2, 3, 4, 1, 2])
    )
    with pytest.raises(ValueError):
        unigram_entropy([])

    metric = UnigramEntropy(ignore_ids=[0])
    metric.update(torch.tensor([[1, 1, 2, 2], [4, 4, 4, 0], [0, 0, 0, 0]]))
    assert int(metric.num_skipped) == 1
    assert metric.compute().item() == pytest.approx(math.log(2) / 2)


def test_distinct_n_known_values():
    texts = ["the cat saw the cat", "the dog"]
    # unigrams: the cat saw the cat the dog -> 4 distinct of 7
    assert distinct_n(texts, 1) == pytest.approx(4 / 7)
    # bigrams: (the cat) (cat saw) (saw the) (the cat) | (the dog) -> 4 distinct of 5
    assert distinct_n(texts, 2) == pytest.approx(4 / 5)
    # trigrams: (the cat saw) (cat saw the) (saw the cat) -> 3 of 3; none crosses samples
    assert distinct_n(texts, 3) == 1.0
    assert distinct_n(torch.tensor([[1, 2, 1, 2], [1, 2, 3, 0]]), 2, ignore_ids=[0]) == 0.6
    assert distinct_n([[1, 2, 1, 2]], 1) == distinct_n([1, 2, 1, 2], 1) == 0.5
    with pytest.raises(ValueError, match="no 3-gram"):
        distinct_n(["a b"], 3)

    for n in (1, 2, 3):
        metric = DistinctN(n)
        metric.update(texts[:1])
        metric.update(texts[1:])
        assert metric.compute().item() == pytest.approx(distinct_n(texts, n))


TEXTS = [
    "the cat sat on the mat",
    "a dog ran out of the window",
    "the cat looked out of the window",
    "",
    "the mat and the dog",
]
IDS = torch.tensor([[1, 1, 2, 3], [4, 4, 4, 4], [1, 2, 3, 4], [2, 2, 2, 0]])


def make_metrics(model_dir: str, **kwargs) -> dict:
    return {
        "ppl": GenerativePerplexity(model_dir, batch_size=2, **kwargs),
        "entropy": UnigramEntropy(ignore_ids=[0], **kwargs),
        **{f"dist{n}": DistinctN(n, **kwargs) for n in (1, 2, 3)},
        "dist2_ids": DistinctN(2, **kwargs),
    }


def feed(metrics: dict, texts: list[str], ids: torch.Tensor) -> None:
    for name, metric in metrics.items():
        metric.update(ids if name in ("entropy", "dist2_ids") else texts)


def test_merged_halves_equal_one_instance(tiny_lm):
    whole, left, right = (make_metrics(str(tiny_lm)) for _ in range(3))
    feed(whole, TEXTS, IDS)
    feed(left, TEXTS[:2], IDS[:2])
    feed(right, TEXTS[2:], IDS[2:])
    for name, metric in whole.items():
        left[name].merge_state(right[name])
        # perplexity: halves are other batches for the scorer; the rest counts tokens exactly
        rel = TINY_RTOL if name == "ppl" else 1e-12
        assert left[name].compute().item() == pytest.approx(metric.compute().item(), rel=rel)


DDP_WORKER = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[3])
from test_metrics import IDS, TEXTS, feed, make_metrics
dist.init_process_group("gloo")
rank = dist.get_rank()
texts, ids = (TEXTS[:2], IDS[:2]) if rank == 0 else (TEXTS[2:], IDS[2:])
metrics, local = make_metrics(sys.argv[1]), make_metrics(sys.argv[1], sync_on_compute=False)
feed(metrics, texts, ids)
feed(local, texts, ids)
values = {name: metric.compute().item() for name, metric in metrics.items()}
values["local"] = {name: metric.compute().item() for name, metric in local.items()}
if rank == 0:
    with open(sys.argv[2], "w") as f:
        json.dump(values, f)
dist.destroy_process_group()
"""


def test_real_two_process_gloo_sync_equals_one_instance(tiny_lm, tmp_path):
    """Two processes each update on half the data; torchmetrics' DDP sync gives the whole."""
    whole = make_metrics(str(tiny_lm))
    feed(whole, TEXTS, IDS)
    out = tmp_path / "values.json"
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "OMP_NUM_THREADS": "1",
        }
        args = [
            sys.executable,
            "-c",
            DDP_WORKER,
            str(tiny_lm),
            str(out),
            str(Path(__file__).parent),
        ]
        procs.append(subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
    values = json.loads(out.read_text())
    for name, metric in whole.items():
        rel = TINY_RTOL if name == "ppl" else 1e-12  # as in test_merged_halves_equal_one_instance
        assert values[name] == pytest.approx(metric.compute().item(), rel=rel), name
        # rank 0's own half alone gives another value: the match above comes from the sync
        assert values["local"][name] != pytest.approx(metric.compute().item(), rel=1e-6), name


# ------------------------------------------------------------------ metrics selected by name
def fake_batch(index, **overrides):
    """A batch of answers with hand-set diagnostics (the fields ``MethodResult`` carries)."""
    from types import SimpleNamespace

    S = len(index)
    fields = dict(
        index=torch.tensor(index),
        tokens=torch.tensor([[1, 1, 2, 2], [3, 3, 3, 3], [1, 2, 3, 4]][:S]),
        texts=["the cat", "the cat sat", "a dog"][:S],
        reward=torch.tensor([0.2, -0.4, 0.9][:S], dtype=torch.float64),
        holdout=None,
        log_normalizer=torch.tensor([-1.0, -3.0, -2.5][:S], dtype=torch.float64),
        # N = 4 particles, T = 2 steps
        ess_trace=torch.tensor([[4.0, 2.0], [4.0, 4.0], [1.0, 3.0]][:S], dtype=torch.float64),
        resampled=torch.tensor([[True, False], [False, False], [True, True]][:S]),
        overtakes=torch.tensor([1, 0, 1][:S]),
        sample_nfe=torch.tensor([2.0, 2.0, 2.0][:S], dtype=torch.float64),
        sample_seconds=torch.tensor([0.5, 0.25, 0.75][:S], dtype=torch.float64),
        num_particles=4,
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


def subset(batch, rows):
    """The samples ``rows`` of ``batch``."""
    from types import SimpleNamespace

    fields = {
        k: v[rows] if isinstance(v, torch.Tensor) else [v[i] for i in rows]
        for k, v in vars(batch).items()
        if k not in ("holdout", "num_particles")
    }
    return SimpleNamespace(**fields, holdout=None, num_particles=batch.num_particles)


ALL = ["reward", "success", "entropy", "dist", "ess", "log_z", "resamples", "overtakes", "nfe",
       "seconds"]  # fmt: skip


def test_metric_values_by_hand():
    from lightning_smc.metrics import MetricSet

    metrics = MetricSet(ALL, reward=True, success_threshold=0.1, sync=False)
    metrics.update(fake_batch([0, 1, 2]))
    values = metrics.compute()
    expected = {
        "reward": (0.2 - 0.4 + 0.9) / 3,
        "success": 2 / 3,  # 0.2 and 0.9 exceed 0.1
        "entropy": (math.log(2) + 0.0 + math.log(4)) / 3,
        # words: the cat | the cat sat | a dog -> 5 distinct of 7; bigrams 3 of 4; trigrams 1/1
        "dist_1": 5 / 7,
        "dist_2": 3 / 4,
        "dist_3": 1.0,
        "ess": ((6 / 2 / 4) + (8 / 2 / 4) + (4 / 2 / 4)) / 3,
        "log_z_mean": -6.5 / 3,
        "log_z_var": torch.tensor([-1.0, -3.0, -2.5], dtype=torch.float64).var().item(),
        "resamples": 3 / 3,
        "overtakes": 2 / 3,
        "overtake_rate": 2 / 3,  # 2 overtakes in 3 resamples
        "nfe": 2.0,
        "nfe_answer": 8.0,  # N = 4 particle sequences per answer
        "seconds": 0.5,
    }

    def se(*xs):  # sample standard deviation (n - 1) / sqrt(n)
        return statistics.stdev(xs) / math.sqrt(len(xs))

    expected |= {
        "reward_se": se(0.2, -0.4, 0.9),
        "success_se": se(1, 0, 1),
        "entropy_se": se(math.log(2), 0.0, math.log(4)),
        "ess_se": se(6 / 8, 8 / 8, 4 / 8),
        "seconds_se": se(0.5, 0.25, 0.75),
    }
    assert values.keys() == expected.keys()
    for key, value in expected.items():
        assert values[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


def test_ratio_standard_error_matches_the_spread_of_the_estimate():
    """The delta-method SE of a token-weighted mean (gen PPL's) against the actual spread of the
    estimate over 2,000 independent data sets of 50 answers (lengths 1..20, NLL per token with
    a length-dependent mean): the mean SE is within 10% of the standard deviation (the SE of a
    standard deviation from 2,000 draws is about 1.6%, and the delta method's own bias at n = 50
    is a few percent)."""
    from lightning_smc.metrics.sample_metrics import ratio_with_se

    g = torch.Generator().manual_seed(0)
    estimates, errors = [], []
    for _ in range(2000):
        b = torch.randint(1, 21, (50,), generator=g).double()
        a = b * (3.0 + 0.05 * b) + torch.randn(50, generator=g, dtype=torch.float64) * b.sqrt()
        m, error = ratio_with_se(a, b)
        assert m == pytest.approx(float(a.sum() / b.sum()), rel=1e-12)
        estimates.append(m)
        errors.append(error)
    spread = torch.tensor(estimates).std().item()
    assert statistics.mean(errors) == pytest.approx(spread, rel=0.10)
    assert ratio_with_se(torch.tensor([2.0]), torch.tensor([4.0])) == (0.5, None)


def test_undefined_statistics_are_left_out_not_invented():
    from lightning_smc.metrics import MetricSet

    metrics = MetricSet(["log_z", "overtakes"], sync=False)
    metrics.update(fake_batch([0], resampled=torch.tensor([[False, False]])))
    values = metrics.compute()
    assert values == {"log_z_mean": -1.0, "overtakes": 1.0}  # no variance of one value, no
    # overtakes per resample without a resample


def test_shards_in_any_order_reduce_bit_for_bit_like_one_set():
    from lightning_smc.metrics import MetricSet

    whole = MetricSet(ALL, reward=True, success_threshold=0.1, sync=False)
    whole.update(fake_batch([0, 1, 2]))
    left = MetricSet(ALL, reward=True, success_threshold=0.1, sync=False)
    right = MetricSet(ALL, reward=True, success_threshold=0.1, sync=False)
    full = fake_batch([0, 1, 2])
    for target, rows in ((right, [2]), (left, [0, 1])):  # the later samples first
        target.update(subset(full, rows))
    for name, metric in right.metrics.items():
        metric.merge_state(left.metrics[name])  # what the DDP sync does: concatenate states
    assert right.compute() == whole.compute()  # exactly: rows are reduced in index order


def test_a_sample_counted_twice_is_an_error():
    from lightning_smc.metrics import MetricSet

    metrics = MetricSet(["reward"], reward=True, sync=False)
    metrics.update(fake_batch([0, 1]))
    metrics.update(fake_batch([1]))
    with pytest.raises(ValueError, match="sample 1 was added more than once"):
        metrics.compute()


def test_bad_metric_names_and_missing_scorers_are_clear_errors(tmp_path):
    from lightning_smc.metrics import MetricSet, parse_metric_names

    with pytest.raises(ValueError, match="unknown metric 'bogus'; choose from reward, success"):
        parse_metric_names("reward,bogus")
    with pytest.raises(ValueError, match="named more than once"):
        parse_metric_names(["ess", "ess"])
    with pytest.raises(ValueError, match="metric 'holdout' needs a holdout"):
        MetricSet(["holdout"], reward=True)
    with pytest.raises(ValueError, match="metric 'success' needs a success_threshold"):
        MetricSet(["success"], reward=True)
    missing = tmp_path / "no_such_lm"
    with pytest.raises(OSError, match="metric 'gen_ppl'.*no_such_lm"):
        MetricSet(["gen_ppl"], gen_ppl_model=str(missing))
    # the defaults leave out what has no scorer
    assert MetricSet().names == ["ess", "log_z", "resamples", "overtakes", "nfe", "seconds"]


def test_gen_ppl_metric_equals_generative_perplexity(tiny_lm):
    from lightning_smc.metrics import MetricSet

    batch = fake_batch([0, 1, 2], texts=["the cat sat on the mat", "", "a dog ran out"])
    metrics = MetricSet(["gen_ppl"], gen_ppl_model=str(tiny_lm), sync=False)
    metrics.update(batch)
    reference = GenerativePerplexity(str(tiny_lm))
    reference.update(batch.texts)
    assert metrics.compute()["gen_ppl"] == pytest.approx(reference.compute().item(), rel=1e-12)


def test_success_threshold_follows_the_rewards_scale():
    from lightning_smc.metrics import success_threshold_of
    from lightning_smc.rewards import VaderSentiment

    assert success_threshold_of(VaderSentiment(success_threshold=0.5)) == 0.5
    # steering away (scale -1): success is raw < 0.5, i.e. reward = -raw > -0.5
    assert success_threshold_of(VaderSentiment(scale=-1.0, success_threshold=0.5)) == -0.5
    assert success_threshold_of(lambda x: x) is None


# ---------------------------------------------------------------------- evaluation callback
def test_callback_logs_weight_histograms_and_named_metrics_to_wandb(tiny_lm, tmp_path, monkeypatch):
    """``RewardEvaluation`` with text metrics (gen PPL under a tiny LM, entropy, Dist-n) on an
    offline W&B run: scalars, the weight-histogram images, scorers loaded once."""
    import lightning as L
    from lightning.pytorch.loggers import WandbLogger
    from test_amortized import ALPHA, toy_module

    import lightning_smc.metrics.perplexity as perplexity
    from lightning_smc.callbacks import RewardEvaluation
    from lightning_smc.methods import Method, RewardTiltSpec
    from lightning_smc.metrics import clear_scorer_cache

    clear_scorer_cache()
    loads = []
    load = perplexity._load
    monkeypatch.setattr(perplexity, "_load", lambda model: loads.append(model) or load(model))
    monkeypatch.setenv("WANDB_MODE", "offline")
    names = ["reward", "entropy", "dist", "gen_ppl", "log_z", "resamples", "overtakes", "nfe"]
    evaluation = RewardEvaluation(
        [
            Method(name="SMCbase", num_particles=3, num_steps=6,
                   potential=RewardTiltSpec(alpha=ALPHA), resample_when="every:2"),
            Method(name="best-of-3", num_particles=3, num_steps=6, select="reward"),
        ],
        num_prompts=3,
        metrics=names,
        gen_ppl_model=str(tiny_lm),
        tokenizer="embedded",  # the toy reward has none: decode the toy ids with the embedded one
    )  # fmt: skip
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="test")
    L.Trainer(
        accelerator="cpu",
        logger=logger,
        callbacks=[evaluation],
        max_steps=4,
        val_check_interval=2,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    ).fit(toy_module(steps_per_epoch=4))
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    import wandb

    wandb.teardown()
    assert len(loads) == 1  # one scorer load for both methods and both validations
    assert len(evaluation.history) == 2
    first, second = (
        {m: {k: v for k, v in row.items() if k != "seconds"} for m, row in h.items() if m != "step"}
        for h in evaluation.history
    )
    assert first == second  # fixed seeds and a frozen base: the same numbers each time
    row = evaluation.history[-1]["SMCbase"]
    assert {"gen_ppl", "entropy", "dist_1", "log_z_mean", "log_z_var", "overtake_rate"} <= set(row)
    reference = GenerativePerplexity(str(tiny_lm))
    reference.update(evaluation.last_samples["SMCbase"].texts)
    assert row["gen_ppl"] == pytest.approx(reference.compute().item(), rel=1e-12)
    history = b"".join(p.read_bytes() for p in run_dir.glob("*.wandb"))
    for key in (b"eval/SMCbase/gen_ppl", b"eval/SMCbase/weights", b"eval/best-of-3/weights"):
        assert key in history, key
    images = [p for p in (run_dir / "files" / "media").rglob("*.png")]
    assert any("weights" in str(p) for p in images), images  # the histograms were written
    assert any("ess" in str(p) for p in images), images
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved[-1]["SMCbase"]["gen_ppl"] == row["gen_ppl"]


def test_callback_bad_metrics_are_clear_errors(tmp_path):
    from test_amortized import toy_module

    from lightning_smc.callbacks import RewardEvaluation
    from lightning_smc.methods import Method

    methods = [Method(name="base", num_particles=1, num_steps=2)]
    with pytest.raises(ValueError, match="unknown metric 'gen-ppl'; choose from"):
        RewardEvaluation(methods, metrics=["gen-ppl"])
    with pytest.raises(ValueError, match="metric 'holdout' needs holdout"):
        RewardEvaluation(methods, metrics=["holdout"])
    with pytest.raises(FileNotFoundError, match="metric 'gen_ppl'.*missing_lm"):
        RewardEvaluation(methods, metrics=["gen_ppl"], gen_ppl_model=str(tmp_path / "missing_lm"))
    evaluation = RewardEvaluation(methods, num_prompts=1, metrics=["dist"])
    with pytest.raises(ValueError, match="read decoded texts.*pass tokenizer"):
        evaluation.evaluate(toy_module())  # a reward without a tokenizer: no texts to read


def test_summary_table_has_a_row_per_metric_and_a_column_per_method():
    from rich.console import Console

    from lightning_smc.evaluation.report import summary_table

    rows = {"A": {"reward": 0.5, "overtake_rate": 0.25}, "B": {"reward": 0.75}}
    console = Console(width=40, record=True)
    console.print(summary_table("t", rows))
    lines = console.export_text().splitlines()
    header = next(line for line in lines if "metric" in line)
    assert header.index("A") < header.index("B")
    reward = next(line for line in lines if "reward" in line)
    assert "0.5" in reward and "0.75" in reward
    rate = next(line for line in lines if "overtake_rate" in line)
    assert "0.25" in rate and rate.rstrip(" │").endswith("-")  # B has no overtake rate
