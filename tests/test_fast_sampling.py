"""The cached sampler is exact: its logits are the full forward's at every position, and
with the same seed it, and the static-buffer (graphed) sampler, draw the same codes as the
reference sampler."""
import pytest
import torch
from prior_cases import ATOL, CASES, HIERARCHIES, prior_and_inputs, small_prior

import vqvae2
from vqvae2.fast_sampling import incremental_logits, sample_level_fast
from vqvae2.graph_sampling import sample_level_graphed
from vqvae2.sampling import sample_level_reference

pytestmark = pytest.mark.usefixtures("one_thread")

# Each sampler against the reference: equal to it, they are equal to each other.
SAMPLERS = [pytest.param(sample_level_fast, id="fast"), pytest.param(sample_level_graphed, id="graph")]


@pytest.mark.parametrize("case", CASES)
def test_cached_logits_equal_the_full_forward_at_every_position(case):
    prior, codes, cond, labels = prior_and_inputs(case)
    with torch.no_grad():
        full = prior(codes, cond, labels)
    torch.testing.assert_close(incremental_logits(prior, codes, cond, labels), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["middle-of-three", "bottom-of-three-given-two"])
def test_in_float64_the_difference_is_rounding_alone(case):
    prior, codes, cond, labels = prior_and_inputs(case)
    prior = prior.double().to(memory_format=torch.channels_last)  # any dtype, any weight layout
    with torch.no_grad():
        full = prior(codes, cond, labels)
    torch.testing.assert_close(incremental_logits(prior, codes, cond, labels), full, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (6, 1), (3, 5), (5, 2)])
def test_cached_logits_equal_the_full_forward_on_any_grid(shape, kernel_size):
    torch.manual_seed(0)
    prior = small_prior(shape, kernel_size)
    codes, cond, labels = torch.randint(16, (3, *shape)), [torch.randint(16, (3, 2, 3))], torch.tensor([0, 1, 2])
    with torch.no_grad():
        full = prior(codes, cond, labels)
    torch.testing.assert_close(incremental_logits(prior, codes, cond, labels), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case, options", [
    ("top-attention", vqvae2.SamplingOptions()),
    ("top-class-conditional", vqvae2.SamplingOptions(0.7, 5)),
    ("bottom-given-top-class-conditional", vqvae2.SamplingOptions(1.5)),
    ("middle-of-three", vqvae2.SamplingOptions(0.9, 3)),
    ("top-class-conditional", vqvae2.SamplingOptions(top_p=0.8)),
], ids=str)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_the_same_seed_draws_the_same_codes_as_the_reference(sampler, case, options):
    prior, _, cond, labels = prior_and_inputs(case)
    prior.train()  # both samplers switch dropout off, and restore the mode
    generators = [torch.Generator().manual_seed(5) for _ in range(2)]
    reference = sample_level_reference(prior, 2, cond, labels, options, generators[0])
    drawn = sampler(prior, 2, cond, labels, options, generators[1])
    assert torch.equal(drawn, reference)
    assert torch.equal(generators[0].get_state(), generators[1].get_state()), "the same draws, in the same order"
    assert prior.training


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("hierarchy", HIERARCHIES)
def test_the_hierarchy_gets_the_same_codes_with_either_sampler(hierarchy, sampler):
    torch.manual_seed(0)
    priors = vqvae2.build_priors(vqvae2.preset("smoke", HIERARCHIES[hierarchy]))
    options = [vqvae2.SamplingOptions(0.8, top_k) for top_k in [None, 6, 4][:len(priors)]]
    kwargs = dict(labels=torch.tensor([1, 8]), options=options, seed=3)
    reference = vqvae2.sample_codes(priors, 2, sampler=sample_level_reference, **kwargs)
    # named, not the default: on a CPU the default is always the cached one, whatever the id says
    drawn = vqvae2.sample_codes(priors, 2, sampler=sampler, **kwargs)
    assert [c.shape for c in drawn] == [c.shape for c in reference]
    assert all(torch.equal(a, b) for a, b in zip(drawn, reference))


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


def test_bad_conditioning_is_a_clear_error():
    prior, _, cond, labels = prior_and_inputs("bottom-given-top-class-conditional")
    with pytest.raises(ValueError, match="cond_codes"):
        sample_level_fast(prior, 2, None, labels)
    with pytest.raises(ValueError, match="pass labels"):
        sample_level_fast(prior, 2, cond, None)


@pytest.mark.cuda
def test_cached_logits_equal_the_full_forward_on_cuda():
    prior, codes, cond, labels = prior_and_inputs("bottom-of-three-given-two")
    prior, codes, cond, labels = prior.cuda(), codes.cuda(), [c.cuda() for c in cond], labels.cuda()
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        full = prior(codes, cond, labels)
        cached = incremental_logits(prior, codes, cond, labels)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)
