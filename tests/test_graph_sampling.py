"""The static-buffer sampler is exact: its steps' logits are the full forward's (and the cached
step's) at every position, it draws what the cached sampler draws for the same seed (on a CPU
both are checked against the reference in tests/test_fast_sampling.py), and on CUDA the
replayed graphs compute what the eager steps compute."""
import pytest
import torch
from prior_cases import ATOL, CASES, prior_and_inputs, small_prior

from vqvae2.draw import SamplingOptions, race_draw, sample_logits
from vqvae2.fast_sampling import incremental_logits, sample_level_fast
from vqvae2.graph_sampling import sample_level_graphed, static_logits

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("case", CASES)
def test_static_logits_equal_the_full_forward_and_the_cached_step_at_every_position(case):
    prior, codes, cond, labels = prior_and_inputs(case)
    with torch.no_grad():
        full = prior(codes, cond, labels)
    static = static_logits(prior, codes, cond, labels)
    torch.testing.assert_close(static, full, atol=ATOL, rtol=0)
    torch.testing.assert_close(static, incremental_logits(prior, codes, cond, labels), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (6, 1), (3, 5), (5, 2)])
def test_static_logits_equal_the_full_forward_on_any_grid(shape, kernel_size):
    torch.manual_seed(0)
    prior = small_prior(shape, kernel_size)
    codes, cond, labels = torch.randint(16, (3, *shape)), [torch.randint(16, (3, 2, 3))], torch.tensor([0, 1, 2])
    with torch.no_grad():
        full = prior(codes, cond, labels)
    torch.testing.assert_close(static_logits(prior, codes, cond, labels), full, atol=ATOL, rtol=0)


def test_in_float64_the_difference_is_rounding_alone():
    prior, codes, cond, labels = prior_and_inputs("bottom-of-three-given-two")
    prior = prior.double()
    with torch.no_grad():
        full = prior(codes, cond, labels)
    torch.testing.assert_close(static_logits(prior, codes, cond, labels), full.float(), atol=1e-6, rtol=0)


def test_the_exponential_race_draws_what_multinomial_draws():
    torch.manual_seed(0)
    logits = torch.randn(4, 33) * 3
    generators = [torch.Generator().manual_seed(11) for _ in range(2)]
    noise = torch.empty(4, 33)
    for options in [SamplingOptions(), SamplingOptions(0.5, 4), SamplingOptions(2.0, 1)]:
        for _ in range(20):
            drawn = race_draw(options.probs(logits), noise, generators[1])
            assert torch.equal(drawn, sample_logits(logits, options, generators[0]))
    assert torch.equal(generators[0].get_state(), generators[1].get_state())


def test_a_tiny_temperature_draws_the_argmax_and_top_1_is_the_argmax():
    prior, codes, cond, labels = prior_and_inputs("bottom-given-top-class-conditional")
    for options in [SamplingOptions(temperature=1e-4), SamplingOptions(top_k=1)]:
        drawn = sample_level_graphed(prior, 2, cond, labels, options, torch.Generator().manual_seed(0))
        # teacher forcing with the drawn codes gives each position's logits given the codes before it
        assert torch.equal(static_logits(prior, drawn, cond, labels).argmax(dim=1), drawn)


def test_bf16_samples_from_a_copy_and_its_logits_are_close():
    prior, codes, cond, labels = prior_and_inputs("middle-of-three")
    with torch.no_grad():
        full = prior(codes, cond, labels)
    logits = static_logits(prior, codes, cond, labels, dtype=torch.bfloat16)
    assert logits.dtype == torch.float32 and prior.embed.weight.dtype == torch.float32
    torch.testing.assert_close(logits, full, atol=0.05, rtol=0.05)
    drawn = sample_level_graphed(prior, 2, cond, labels, generator=torch.Generator().manual_seed(0),
                                 dtype=torch.bfloat16)
    assert drawn.shape == (2, *prior.shape) and 0 <= drawn.min() and drawn.max() < prior.num_codes


def test_bad_input_is_a_clear_error():
    prior, _, cond, labels = prior_and_inputs("bottom-given-top-class-conditional")
    with pytest.raises(ValueError, match="cond_codes"):
        sample_level_graphed(prior, 2, None, labels)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            sample_level_graphed(prior, 2, cond, labels, capture=True)


def _on_cuda(case):
    prior, codes, cond, labels = prior_and_inputs(case)
    return (prior.cuda(), codes.cuda(), [c.cuda() for c in cond] if cond else None,
            labels.cuda() if labels is not None else None)


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["top-attention", "bottom-of-three-given-two", "bottom-given-top-class-conditional"])
def test_the_captured_steps_logits_equal_the_uncaptured_steps_at_every_position(case):
    prior, codes, cond, labels = _on_cuda(case)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        eager = static_logits(prior, codes, cond, labels, capture=False)
        captured = static_logits(prior, codes, cond, labels, capture=True)
        with torch.no_grad():
            full = prior(codes, cond, labels)
    torch.testing.assert_close(captured, eager, atol=ATOL, rtol=0)
    torch.testing.assert_close(captured, full, atol=1e-4, rtol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_the_captured_sampler_samples_and_a_seed_repeats_it(dtype):
    prior, _, cond, labels = _on_cuda("middle-of-three")

    def sample(capture):
        generator = torch.Generator(device="cuda").manual_seed(5)
        return sample_level_graphed(prior, 2, cond, labels, SamplingOptions(0.9, 3), generator, dtype=dtype,
                                    capture=capture)

    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        first, again, eager = sample(True), sample(True), sample(False)
    assert first.shape == (2, *prior.shape) and 0 <= first.min() and first.max() < prior.num_codes
    assert torch.equal(first, again)
    # The graph advances the generator's philox offset as the eager step does: the same noise.
    assert torch.equal(first, eager)


@pytest.mark.cuda
def test_on_cuda_the_graphed_sampler_draws_the_cached_samplers_codes():
    prior, _, cond, labels = _on_cuda("bottom-given-top-class-conditional")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        cached, graphed = (sampler(prior, 2, cond, labels, SamplingOptions(), torch.Generator(device="cuda").manual_seed(7))
                           for sampler in (sample_level_fast, sample_level_graphed))
    assert torch.equal(graphed, cached)
