"""Classifier-based rejection (Razavi et al. 2019, Sec. 4.1): per-class quotas, the judge's
best candidates kept, counts that invert each other."""
import math

import numpy as np
import pytest
import torch

import vqvae2
from vqvae2.rejection import accept_mask, candidates_needed, keep_count

RATES = (1.0, 0.5, 0.25, 0.1)


def _per_class(mask: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor):
    for c in labels.unique():
        in_class = labels == c
        yield mask[in_class], scores[in_class]


@pytest.mark.parametrize("rate", [0, -0.1, 1.5, math.nan, "0.5", True, None])
def test_rates_outside_0_1_are_refused_with_what_a_rate_is(rate):
    with pytest.raises(ValueError, match=r"acceptance rate must be a number in \(0, 1\]"):
        accept_mask(torch.rand(4), torch.zeros(4, dtype=torch.long), rate)
    with pytest.raises(ValueError, match="acceptance rate"):
        candidates_needed(10, rate)


@pytest.mark.parametrize("rate", RATES + (0.3, 0.7, 0.01))
def test_candidates_needed_and_keep_count_invert_each_other(rate):
    for n_keep in range(1, 500):
        assert keep_count(candidates_needed(n_keep, rate), rate) == n_keep
    assert candidates_needed(250, 1.0) == 250 and candidates_needed(25, 0.1) == 250  # not 251: 25 / 0.1 is inexact
    assert candidates_needed(0, rate) == 0 and keep_count(0, rate) == 0


def test_a_class_with_fewer_candidates_than_one_over_the_rate_still_keeps_one():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    mask = accept_mask(torch.rand(len(labels), generator=torch.Generator().manual_seed(0)), labels, 0.1)
    assert mask[labels == 0].sum() == 1 and mask[labels == 1].sum() == 2


@pytest.fixture(scope="module")
def judged(fashion_mnist_test_split):
    """Real images scored by a real judge (a smoke-preset ResNet, lightly trained): the
    probability of each candidate's intended class, 10 classes x 40 candidates."""
    images, labels = fashion_mnist_test_split
    images = torch.from_numpy(images[:400, None, 6:22, 6:22]).float() / 255  # 16x16 centre crops
    intended = torch.from_numpy(labels[:400]).long()
    vqvae2.seed_everything(0)
    config = vqvae2.preset("smoke")
    judge = vqvae2.build_classifier(config)
    optimizer, _ = vqvae2.make_optimizer(judge, config.train_classifier)
    for step in range(5):
        vqvae2.classifier_step(judge, optimizer, images[step * 32:(step + 1) * 32], intended[step * 32:(step + 1) * 32],
                               amp="off")
    with torch.no_grad():
        probs = torch.softmax(judge.eval()(images), dim=1)
    scores = probs.gather(1, intended[:, None]).squeeze(1)
    return scores, intended


@pytest.mark.parametrize("rate", RATES)
def test_each_class_keeps_its_share_and_its_most_confident_candidates(judged, rate):
    scores, labels = judged
    mask = accept_mask(scores, labels, rate)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert mask.sum() == pytest.approx(rate * len(scores), abs=len(labels.unique()))
    for kept, class_scores in _per_class(mask, labels, scores):
        assert kept.sum() == keep_count(len(kept), rate)
        if rate < 1:
            assert class_scores[kept].min() >= class_scores[~kept].max()
    if rate < 1:
        assert scores[mask].mean() > scores[~mask].mean()


def test_unequal_classes_each_keep_their_share():
    generator = torch.Generator().manual_seed(1)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([100, 40, 12, 7])])
    labels = labels[torch.randperm(len(labels), generator=generator)]
    scores = torch.rand(len(labels), generator=generator)
    mask = accept_mask(scores, labels, 0.25)
    assert [int(mask[labels == c].sum()) for c in range(4)] == [25, 10, 3, 1]


def test_ties_are_broken_by_candidate_order_and_inputs_may_be_numpy():
    scores = np.array([0.5, 0.9, 0.5, 0.5, 0.5, 0.5], dtype=np.float32)
    labels = np.array([0, 0, 0, 0, 1, 1])
    mask = accept_mask(scores, labels, 0.5)
    assert mask.tolist() == [True, True, False, False, True, False]
    assert torch.equal(accept_mask(torch.from_numpy(scores), torch.from_numpy(labels), 0.5), mask)


def test_unjudged_or_malformed_candidates_are_refused():
    labels = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="never judged"):
        accept_mask(torch.tensor([0.2, float("nan"), 0.1]), labels, 0.5)
    with pytest.raises(ValueError, match="equal length"):
        accept_mask(torch.rand(4), labels, 0.5)
    with pytest.raises(ValueError, match="labels integers"):
        accept_mask(torch.rand(3), labels.float(), 0.5)
    assert accept_mask(torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).shape == (0,)
