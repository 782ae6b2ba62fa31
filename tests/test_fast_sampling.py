"""The cached sampler is exact: its logits are the full forward's at every position, and
with the same seed it draws the same codes as the reference sampler."""
import pytest
import torch
from test_prior import CASES, THREE_LEVELS, _prior_and_inputs

import vqvae2
from vqvae2.config import PriorConfig
from vqvae2.fast_sampling import incremental_logits, sample_level_fast
from vqvae2.prior import PixelCNNPrior
from vqvae2.sampling import sample_level_reference

ATOL = 1e-5  # fp32; the observed difference is a few 1e-7


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second intra-op thread only adds waiting, a lot of it on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", CASES)
def test_cached_logits_equal_the_full_forward_at_every_position(case):
    prior, codes, cond, labels = _prior_and_inputs(case)
    with torch.no_grad():
        full = prior(codes, cond, labels)
    torch.testing.assert_close(incremental_logits(prior, codes, cond, labels), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["middle-of-three", "bottom-of-three-given-two"])
def test_in_float64_the_difference_is_rounding_alone(case):
    prior, codes, cond, labels = _prior_and_inputs(case)
    prior = prior.double().to(memory_format=torch.channels_last)  # any dtype, any weight layout
    with torch.no_grad():
        full = prior(codes, cond, labels)
    torch.testing.assert_close(incremental_logits(prior, codes, cond, labels), full, atol=1e-12, rtol=0)


def _small_prior(shape: tuple[int, int], kernel_size: int) -> PixelCNNPrior:
    """Every feature at once (attention, a level above, labels) on any grid."""
    config = PriorConfig(channels=8, layers=3, kernel_size=kernel_size, attention_layers=1, attention_heads=2,
                         dropout=0.1, embed_dim=4, cond_channels=4, cond_res_blocks=1)
    return PixelCNNPrior(config, num_codes=16, shape=shape, cond_shapes=[(2, 3)], num_classes=3).eval()


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (6, 1), (3, 5), (5, 2)])
def test_cached_logits_equal_the_full_forward_on_any_grid(shape, kernel_size):
    torch.manual_seed(0)
    prior = _small_prior(shape, kernel_size)
    codes, cond, labels = torch.randint(16, (3, *shape)), [torch.randint(16, (3, 2, 3))], torch.tensor([0, 1, 2])
    with torch.no_grad():
        full = prior(codes, cond, labels)
    torch.testing.assert_close(incremental_logits(prior, codes, cond, labels), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case, temperature, top_k", [
    ("top-attention", 1.0, None),
    ("top-class-conditional", 0.7, 5),
    ("bottom-given-top-class-conditional", 1.5, None),
    ("middle-of-three", 0.9, 3),
])
def test_the_same_seed_draws_the_same_codes_as_the_reference(case, temperature, top_k):
    prior, _, cond, labels = _prior_and_inputs(case)
    prior.train()  # both samplers switch dropout off, and restore the mode
    generators = [torch.Generator().manual_seed(5) for _ in range(2)]
    reference, fast = (
        sampler(prior, 2, cond, labels, temperature, top_k, g)
        for sampler, g in zip([sample_level_reference, sample_level_fast], generators)
    )
    assert torch.equal(fast, reference)
    assert torch.equal(generators[0].get_state(), generators[1].get_state()), "the same draws, in the same order"
    assert prior.training


# smoke's 4x4 + 8x8, and three levels 2x2 + 4x4 + 8x8 (THREE_LEVELS on 16x16 images, for speed)
HIERARCHIES = {"two-levels": {}, "three-levels": {**THREE_LEVELS, "image_size": 16}}


@pytest.mark.parametrize("hierarchy", HIERARCHIES)
def test_the_hierarchy_gets_the_same_codes_with_either_sampler(hierarchy):
    torch.manual_seed(0)
    priors = vqvae2.build_priors(vqvae2.preset("smoke", HIERARCHIES[hierarchy]))
    kwargs = dict(labels=torch.tensor([1, 8]), temperature=0.8, top_k=[None, 6, 4][:len(priors)], seed=3)
    reference = vqvae2.sample_codes(priors, 2, sampler=sample_level_reference, **kwargs)
    fast = vqvae2.sample_codes(priors, 2, **kwargs)
    assert [c.shape for c in fast] == [c.shape for c in reference]
    assert all(torch.equal(a, b) for a, b in zip(fast, reference))


def test_the_default_sampler_is_the_fastest_for_the_device(monkeypatch):
    import vqvae2.sampling

    used = []
    monkeypatch.setattr(vqvae2.sampling, "sample_level_fast", lambda *a: used.append("cached") or sample_level_fast(*a))
    monkeypatch.setattr(vqvae2.sampling, "sample_level_graphed",
                        lambda *a, **k: used.append(("graphed", k.get("dtype"))) or sample_level_fast(*a))
    priors = [vqvae2.build_prior(vqvae2.preset("smoke"), 0).eval()]
    vqvae2.sample_codes(priors, 2, labels=torch.tensor([0, 1]), seed=0)
    assert used == ["cached"]  # on a CPU; on CUDA it is the graphed one (tests/test_graph_sampling.py)
    used.clear()
    vqvae2.sample_codes(priors, 2, labels=torch.tensor([0, 1]), seed=0, dtype=torch.bfloat16)
    assert used == [("graphed", torch.bfloat16)]
    with pytest.raises(ValueError, match="a sampler or a dtype"):
        vqvae2.sample_codes(priors, 2, labels=torch.tensor([0, 1]), sampler=sample_level_fast, dtype=torch.bfloat16)


def test_bad_conditioning_and_temperature_are_clear_errors():
    prior, _, cond, labels = _prior_and_inputs("bottom-given-top-class-conditional")
    with pytest.raises(ValueError, match="cond_codes"):
        sample_level_fast(prior, 2, None, labels)
    with pytest.raises(ValueError, match="pass labels"):
        sample_level_fast(prior, 2, cond, None)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample_level_fast(prior, 2, cond, labels, temperature=0.0)


@pytest.mark.cuda
def test_cached_logits_equal_the_full_forward_on_cuda():
    prior, codes, cond, labels = _prior_and_inputs("bottom-of-three-given-two")
    prior, codes, cond, labels = prior.cuda(), codes.cuda(), [c.cuda() for c in cond], labels.cuda()
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        full = prior(codes, cond, labels)
        cached = incremental_logits(prior, codes, cond, labels)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)
