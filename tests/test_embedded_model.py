"""The embedded base model (lightning_smc/assets/mdlm_tiny): present, small, loadable, English-like."""

import re

import torch

from lightning_smc import SMCSampler
from lightning_smc.data.corpora import load_corpus
from lightning_smc.models.loading import EMBEDDED, load_model


def test_embedded_checkpoint_is_complete_and_fits_git():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (EMBEDDED / name).is_file(), name
    assert sum(p.stat().st_size for p in EMBEDDED.iterdir()) < 25 * 2**20


def _word_rate(texts, vocabulary):
    words = [w for t in texts for w in re.findall(r"[a-z']+", t.lower())]
    return sum(w in vocabulary for w in words) / max(len(words), 1), len(words)


def test_embedded_samples_are_mostly_corpus_words():
    denoiser, spec = load_model(EMBEDDED)
    sampler = SMCSampler(denoiser, num_steps=64, unmasking="ancestral")
    out = sampler.sample(64, batch_size=16, generator=torch.Generator().manual_seed(0))
    assert (out.tokens != denoiser.mask_id).all()
    texts = [spec.tokenizer.decode(x[0].tolist(), skip_special_tokens=True) for x in out.tokens]
    vocabulary = {
        w for doc in load_corpus("shakespeare") for w in re.findall(r"[a-z']+", doc.lower())
    }
    rate, n = _word_rate(texts, vocabulary)
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, denoiser.mask_id, (16, 64), generator=g)
    baseline, _ = _word_rate(
        [spec.tokenizer.decode(x.tolist(), skip_special_tokens=True) for x in noise], vocabulary
    )
    assert n > 300
    # three standard errors of the word rate below it (the pooled rate over 96 samples is ~0.81)
    low = rate - 3 * (rate * (1 - rate) / n) ** 0.5
    assert low > 0.7 and low > baseline + 0.2, (rate, n, baseline, texts)
