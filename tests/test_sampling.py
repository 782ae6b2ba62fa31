import pytest
import torch

import vqvae2
from vqvae2 import SamplingOptions
from vqvae2.sampling import sample_logits


@pytest.fixture(scope="module")
def smoke_models():
    torch.manual_seed(0)
    config = vqvae2.preset("smoke")
    return config, vqvae2.build_autoencoder(config).eval(), vqvae2.build_priors(config)


def test_the_same_seed_gives_the_same_codes_and_another_seed_does_not(smoke_models):
    _, _, priors = smoke_models
    labels = torch.tensor([0, 1, 2, 3])
    a = vqvae2.sample_codes(priors, 4, labels=labels, seed=7)
    b = vqvae2.sample_codes(priors, 4, labels=labels, seed=7)
    c = vqvae2.sample_codes(priors, 4, labels=labels, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_class_labels_change_the_samples(smoke_models):
    _, _, priors = smoke_models
    a = vqvae2.sample_codes(priors, 4, labels=torch.tensor([0, 0, 0, 0]), seed=3)
    b = vqvae2.sample_codes(priors, 4, labels=torch.tensor([5, 5, 5, 5]), seed=3)
    assert not torch.equal(a[0], b[0])


def test_sample_images_decodes_codes_of_every_level(smoke_models):
    config, autoencoder, priors = smoke_models
    images, codes = vqvae2.sample_images(autoencoder, priors, 3, labels=torch.tensor([1, 2, 3]), seed=0)
    assert images.shape == (3, 1, 16, 16)
    assert images.min() >= 0 and images.max() <= 1
    assert [tuple(c.shape) for c in codes] == [(3, 4, 4), (3, 8, 8)]
    assert all(0 <= c.min() and c.max() < config.autoencoder.codebook_size for c in codes)


def test_three_level_hierarchy_samples_each_level_given_all_above():
    torch.manual_seed(0)
    config = vqvae2.preset("smoke", {
        "image_size": 32, "num_classes": 0, "autoencoder.strides": [2, 2, 2],
        "priors": [{"channels": 8, "layers": 1, "kernel_size": 3, "embed_dim": 4, "cond_channels": 4,
                    "cond_res_blocks": 0}] * 3,
    })
    priors = vqvae2.build_priors(config)
    # A random prior barely listens to the levels above (its logits move by ~0.01), too little
    # to change draws of the same seed: strengthen the conditioning (it saturates the gates),
    # and sample cold so logit changes outweigh the draw's noise.
    with torch.no_grad():
        for prior in priors[1:]:
            for layer in prior.layers:
                layer.cond.weight.mul_(30)
    given = []

    def recording_sampler(prior, n, cond_codes, *args):
        given.append(None if cond_codes is None else [c.clone() for c in cond_codes])
        return vqvae2.sample_level_fast(prior, n, cond_codes, *args)

    images, codes = vqvae2.sample_images(vqvae2.build_autoencoder(config), priors, 2, seed=1, sampler=recording_sampler)
    assert [tuple(c.shape[1:]) for c in codes] == [(4, 4), (8, 8), (16, 16)]
    assert images.shape == (2, 1, 32, 32)
    # sample_codes drew each level given exactly the codes of all the levels above it.
    assert given[0] is None
    for level in (1, 2):
        assert len(given[level]) == level and all(torch.equal(g, c) for g, c in zip(given[level], codes[:level]))

    for level in (1, 2):
        prior, above = priors[level], codes[:level]

        def draw(cond_codes):
            return vqvae2.sample_level_fast(prior, 2, cond_codes, options=vqvae2.SamplingOptions(temperature=0.1),
                                            generator=torch.Generator().manual_seed(5))

        drawn = draw(above)
        assert torch.equal(draw(above), drawn)  # same codes above, same seed: same codes
        logits = vqvae2.incremental_logits(prior, drawn, above)
        for changed_level in range(level):  # each level above, changed alone, changes this level
            changed = list(above)
            changed[changed_level] = (above[changed_level] + 1) % prior.num_codes
            shift = (vqvae2.incremental_logits(prior, drawn, changed) - logits).abs()
            assert shift.mean() > 1e-2  # exactly 0 if the prior ignored that level (rounding is ~1e-7)
            assert not torch.equal(draw(changed), drawn)


def test_top_k_one_is_greedy_and_temperature_sharpens():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]]).repeat(2000, 1)
    generator = torch.Generator().manual_seed(0)
    assert torch.all(sample_logits(logits, SamplingOptions(top_k=1), generator) == 1)
    assert set(sample_logits(logits, SamplingOptions(top_k=2), generator).tolist()) == {1, 2}
    hot = (sample_logits(logits, SamplingOptions(temperature=2.0), generator) == 1).float().mean()
    cold = (sample_logits(logits, SamplingOptions(temperature=0.25), generator) == 1).float().mean()
    assert cold > 0.95 > hot


def test_top_p_draws_from_the_smallest_nucleus_holding_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    generator = torch.Generator().manual_seed(0)

    def drawn(top_p: float) -> set[int]:
        return set(sample_logits(logits, SamplingOptions(top_p=top_p), generator).tolist())

    assert drawn(0.5) == {0}  # the likeliest alone holds 0.5
    assert drawn(0.7) == {0, 1}  # 0.5 is short of 0.7: the next one too
    assert drawn(0.95) == {0, 1, 2} and drawn(1.0) == {0, 1, 2, 3}
    kept = SamplingOptions(top_p=0.7).probs(logits[:1])
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))  # renormalised over the nucleus
    assert SamplingOptions(top_p=0.7).described() == "temperature 1, top-k off, top-p 0.7"
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingOptions(top_p=0.0)


def test_sampling_arguments_are_validated(smoke_models):
    _, _, priors = smoke_models
    with pytest.raises(ValueError, match="temperature must be > 0"):
        vqvae2.sample_codes(priors, 1, labels=torch.tensor([0]), options=SamplingOptions(temperature=0.0))
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        SamplingOptions(top_k=0)
    with pytest.raises(ValueError, match="options has 3 entries"):
        vqvae2.sample_codes(priors, 1, labels=torch.tensor([0]), options=[SamplingOptions()] * 3)
    with pytest.raises(ValueError, match="pass labels"):
        vqvae2.sample_codes(priors, 1)
