import copy
import math

import pytest
import torch

from vqvae2.quantize import VectorQuantizer, accumulate_codebook_updates


def _quantizer(codebook, **kwargs) -> VectorQuantizer:
    codebook = torch.tensor(codebook, dtype=torch.float32)
    vq = VectorQuantizer(codebook.shape[0], codebook.shape[1], **kwargs)
    vq.embed.copy_(codebook)
    vq.embed_sum.copy_(codebook)
    return vq


def _grid(vectors) -> torch.Tensor:
    """Rows of D-vectors -> a (1, D, 1, N) feature map, positions in order."""
    return torch.tensor(vectors, dtype=torch.float32).t().reshape(1, -1, 1, len(vectors))


def test_assignment_loss_and_stats_match_a_hand_computed_example():
    vq = _quantizer([[0, 0], [1, 0], [0, 1]], dead_code_steps=0).eval()
    z = _grid([[0.1, 0.2], [0.9, -0.1], [0.2, 0.7], [0.6, 0.5]])
    out = vq(z)
    # [0.6, 0.5]: distance^2 to e1 is 0.41, to e0 and e2 it is 0.61.
    assert out.codes.tolist() == [[[0, 1, 2, 1]]]
    expected_q = [[0, 0], [1, 0], [0, 1], [1, 0]]
    assert torch.equal(out.quantized[0, :, 0, :].t(), torch.tensor(expected_q, dtype=torch.float32))
    # beta * mean squared error over all 8 numbers.
    squared = 0.1**2 + 0.2**2 + 0.1**2 + 0.1**2 + 0.2**2 + 0.3**2 + 0.4**2 + 0.5**2
    assert out.loss.item() == pytest.approx(0.25 * squared / 8, rel=1e-6)
    assert out.usage.item() == 3
    # histogram 1, 2, 1 -> p = 1/4, 1/2, 1/4
    entropy = -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))
    assert out.perplexity.item() == pytest.approx(math.exp(entropy), rel=1e-5)


def test_gradients_pass_straight_through_to_the_encoder():
    vq = _quantizer([[0, 0], [1, 0], [0, 1]], dead_code_steps=0).eval()
    z = _grid([[0.1, 0.2], [0.9, -0.1]]).requires_grad_()
    weights = torch.randn(1, 2, 1, 2)
    (vq(z).quantized * weights).sum().backward()
    assert torch.allclose(z.grad, weights)


def test_ema_update_moves_codes_to_the_mean_of_their_inputs():
    vq = _quantizer([[0, 0], [10, 10]], decay=0.5, eps=1e-5, dead_code_steps=0).train()
    vq(_grid([[1, 1], [3, 3], [9, 11]]))
    # cluster sizes: 0.5 * 1 + 0.5 * (2, 1) = (1.5, 1.0); sums: 0.5 * e + 0.5 * (sum of inputs)
    assert torch.allclose(vq.cluster_size, torch.tensor([1.5, 1.0]))
    assert torch.allclose(vq.embed_sum, torch.tensor([[2.0, 2.0], [9.5, 10.5]]))
    n, k, eps = 2.5, 2, 1e-5
    smoothed = [(1.5 + eps) / (n + k * eps) * n, (1.0 + eps) / (n + k * eps) * n]
    expected = torch.tensor([[2.0 / smoothed[0]] * 2, [9.5 / smoothed[1], 10.5 / smoothed[1]]])
    assert torch.allclose(vq.embed, expected, rtol=1e-6)


def test_eval_mode_and_encode_never_move_the_codebook():
    vq = _quantizer([[0, 0], [10, 10]], dead_code_steps=1).eval()
    before = vq.embed.clone()
    vq(_grid([[1, 1], [3, 3]]))
    assert torch.equal(vq.embed, before)
    vq.train()
    vq(_grid([[1, 1], [3, 3]]), update=False)
    assert torch.equal(vq.embed, before)


def test_dead_codes_are_reseeded_from_encoder_outputs_after_the_configured_steps():
    vq = _quantizer([[0, 0], [1, 1], [100, 100]], dead_code_steps=3).train()
    inputs = [[0.1, 0.0], [0.9, 1.1], [0.0, 0.2], [1.0, 0.8]]
    z = _grid(inputs)
    for step in range(2):
        out = vq(z)
        assert out.usage.item() == 2
        assert vq.embed[2, 0].item() > 50, "restarted too early"
    vq(z)  # third step without use: code 2 is re-seeded from one of the current inputs
    assert any(torch.equal(vq.embed[2], torch.tensor(row)) for row in inputs)
    assert vq.steps_unused[2].item() == 0
    assert vq.cluster_size[2].item() == 1.0


def test_a_restarted_code_gets_used():
    torch.manual_seed(0)
    vq = _quantizer([[0.0, 0.0], [50.0, 50.0], [60.0, 60.0], [70.0, 70.0]], dead_code_steps=1).train()
    z = torch.randn(4, 2, 4, 4)
    assert vq(z).usage.item() == 1
    usage_after = vq(z).usage.item()
    assert usage_after > 1


def test_kmeans_initialisation_finds_the_clusters_of_the_first_batch():
    torch.manual_seed(0)
    centers = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0], [0.0, -5.0]])
    points = centers.repeat_interleave(64, dim=0) + 0.05 * torch.randn(256, 2)
    z = points.t().reshape(1, 2, 16, 16)
    vq = VectorQuantizer(4, 2, kmeans_init=True, dead_code_steps=0).train()
    assert not bool(vq.initialized)
    out = vq(z)
    assert bool(vq.initialized)
    assert out.usage.item() == 4
    nearest = torch.cdist(vq.embed, centers).min(dim=1).values
    assert nearest.max().item() < 0.2


def test_statistics_stay_fp32_under_autocast():
    vq = VectorQuantizer(8, 4, dead_code_steps=0).train()
    z = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z)
    assert out.quantized.dtype == torch.float32
    for name in ("embed", "embed_sum", "cluster_size"):
        assert getattr(vq, name).dtype == torch.float32
    assert torch.isfinite(vq.embed).all()


def test_lookup_inverts_the_assignment():
    vq = VectorQuantizer(16, 3).eval()
    out = vq(torch.randn(2, 3, 4, 5))
    # equal up to the rounding of the straight-through sum z + (e - z)
    assert torch.allclose(vq.lookup(out.codes), out.quantized, atol=1e-6)


# --- one codebook update per optimizer step (gradient accumulation) ------------------------

_BUFFERS = ("embed", "embed_sum", "cluster_size", "steps_unused")


def test_micro_batches_move_the_codebook_once_as_the_whole_batch_would():
    torch.manual_seed(0)
    z = torch.randn(10, 4, 3, 3)
    whole = VectorQuantizer(16, 4, decay=0.9, dead_code_steps=50).train()
    accumulated, per_micro_batch = copy.deepcopy(whole), copy.deepcopy(whole)
    expected = whole(z).codes
    with accumulate_codebook_updates(accumulated):
        codes = [accumulated(chunk).codes for chunk in z.split(4)]  # 4 + 4 + 2 samples
    # Every micro-batch was quantized by the step's codebook, as the whole batch was ...
    assert torch.equal(torch.cat(codes), expected)
    # ... and the step moved the codebook once, by the whole batch's statistics.
    for name in _BUFFERS:
        assert torch.allclose(getattr(accumulated, name), getattr(whole, name), rtol=1e-6, atol=1e-6), name
    # Not what updating per micro-batch (three EMA steps of decay 0.9) would give:
    for chunk in z.split(4):
        per_micro_batch(chunk)
    assert not torch.allclose(per_micro_batch.embed, whole.embed, atol=1e-3)


def test_a_step_that_raises_applies_nothing_and_later_steps_update_at_once():
    vq = _quantizer([[0, 0], [10, 10]], decay=0.5, dead_code_steps=0).train()
    before = vq.embed.clone()
    with pytest.raises(RuntimeError, match="out of memory"):
        with accumulate_codebook_updates(vq):
            vq(_grid([[1, 1], [3, 3]]))
            raise RuntimeError("out of memory")
    assert torch.equal(vq.embed, before)
    vq(_grid([[1, 1], [3, 3]]))  # outside the context: the usual update in forward
    assert not torch.equal(vq.embed, before)


def test_dead_codes_count_steps_not_micro_batches_and_restart_from_any_micro_batch():
    vq = _quantizer([[0, 0], [1, 1], [100, 100]], dead_code_steps=2).train()
    micro_batches = [[[0.1, 0.0], [0.9, 1.1]], [[0.0, 0.2]], [[1.0, 0.8], [0.2, 0.1], [0.8, 0.9]]]
    rows = [torch.tensor(row) for batch in micro_batches for row in batch]
    with accumulate_codebook_updates(vq):
        for batch in micro_batches:
            vq(_grid(batch))
    assert vq.steps_unused.tolist() == [0, 0, 1]  # one step without use, not three
    assert vq.embed[2, 0].item() > 50
    with accumulate_codebook_updates(vq):
        for batch in micro_batches:
            vq(_grid(batch))
    assert any(torch.equal(vq.embed[2], row) for row in rows)  # re-seeded from an encoder output of the step
    assert vq.steps_unused[2].item() == 0 and vq.cluster_size[2].item() == 1.0


def test_a_restart_draws_uniformly_over_the_whole_step():
    # Micro-batches of 1, 1 and 2 rows, each on its own spot: a dead code is re-seeded from a row
    # of the step picked uniformly, so from the third micro-batch half of the time.
    torch.manual_seed(0)
    vq = _quantizer([[0, 0], [1000, 1000]], dead_code_steps=1).train()
    micro_batches = [[[0.1, 0.0]], [[0.2, 0.0]], [[0.3, 0.0], [0.3, 0.0]]]
    origins = []
    for _ in range(400):
        vq.embed[1] = vq.embed_sum[1] = 1000.0  # dead again
        with accumulate_codebook_updates(vq):
            for batch in micro_batches:
                vq(_grid(batch))
        origins.append(round(vq.embed[1, 0].item(), 1))
    share = {x: origins.count(x) / len(origins) for x in (0.1, 0.2, 0.3)}
    # 400 draws: standard deviations of 0.022 (share 1/4) and 0.025 (share 1/2); 0.1 is 4 of them.
    assert share[0.1] == pytest.approx(0.25, abs=0.1) and share[0.2] == pytest.approx(0.25, abs=0.1)
    assert share[0.3] == pytest.approx(0.5, abs=0.1)


def test_kmeans_initialises_from_the_first_micro_batch_and_the_ema_waits_for_the_step():
    torch.manual_seed(0)
    centers = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0], [0.0, -5.0]])
    points = centers.repeat_interleave(64, dim=0) + 0.05 * torch.randn(256, 2)
    first = points.t().reshape(1, 2, 16, 16)
    vq = VectorQuantizer(4, 2, kmeans_init=True, dead_code_steps=0).train()
    with accumulate_codebook_updates(vq):
        assert vq(first).usage.item() == 4
        initialised = vq.embed.clone()
        assert torch.cdist(initialised, centers).min(dim=1).values.max().item() < 0.2
        vq(first + 1.0)  # quantized by the k-means codebook; k-means does not run again
        assert torch.equal(vq.embed, initialised)
    assert bool(vq.initialized) and not torch.equal(vq.embed, initialised)  # one EMA update, at the end
