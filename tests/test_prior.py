import pytest
import torch
from prior_cases import CASES, prior_and_inputs

import vqvae2
from vqvae2.prior import PixelCNNPrior


@pytest.mark.parametrize("case", CASES)
def test_logits_never_depend_on_the_current_or_later_positions(case):
    prior, codes, cond, labels = prior_and_inputs(case)
    height, width = prior.shape
    x = prior.embed_codes(codes).detach().requires_grad_()
    last = height * width - 1
    for t in sorted({0, 1, width - 1, width, width + 1, last // 2, last - 1, last}):
        r, c = divmod(t, width)
        x.grad = None
        prior.logits_from_embedding(x, cond, labels)[0, :, r, c].sum().backward()
        per_position = x.grad[0].abs().sum(dim=0).flatten()  # (H * W,) in raster order
        assert torch.all(per_position[t:] == 0), f"position {t} sees positions >= {t}"
        assert torch.all(x.grad[1] == 0), "samples of a batch must not see each other"
        if t > 0:
            assert per_position[:t].sum() > 0, f"position {t} sees nothing before it"
        if c > 0:
            assert per_position[t - 1] > 0, f"position {t} does not see its left neighbour"


@pytest.mark.parametrize("case", ["bottom-given-top", "bottom-of-three-given-two", "bottom-conditioned-at-the-grid-above",
                                  "bottom-of-three-conditioned-at-the-grid-above"])
def test_the_levels_above_change_a_lower_priors_logits(case):
    prior, codes, cond, labels = prior_and_inputs(case)
    other = [torch.roll(c, shifts=1, dims=0) for c in cond]  # swap the two samples' conditioning
    with torch.no_grad():
        assert not torch.allclose(prior(codes, cond, labels), prior(codes, other, labels))


def corner_to_corner(cond_resolution: str, res_blocks: int) -> float:
    """How much the bottom prior's conditioning at its last position (15, 15) changes with the top
    code at (0, 0), fashion-mnist's grids (8x8 above 16x16), narrow."""
    config = vqvae2.preset("fashion-mnist", {"priors.1": {"channels": 8, "layers": 1, "embed_dim": 4, "cond_channels": 8,
                                                          "cond_res_blocks": res_blocks,
                                                          "cond_resolution": cond_resolution}})
    torch.manual_seed(0)
    stack = vqvae2.build_prior(config, 1).cond_stack
    top = torch.randint(512, (1, 8, 8))
    other = top.clone()
    other[0, 0, 0] = (top[0, 0, 0] + 1) % 512
    with torch.no_grad():
        return (stack([top], (16, 16)) - stack([other], (16, 16)))[0, :, 15, 15].abs().sum().item()


def test_the_conditioning_stack_at_the_grid_above_sees_as_far_as_four_times_its_blocks_at_this_grid():
    # The same work: 2 blocks at 16x16 see 3 top codes around; 8 at 8x8 the whole 8x8 grid.
    assert corner_to_corner("level", 2) == 0
    assert corner_to_corner("above", 8) > 0
    assert corner_to_corner("above", 2) == 0  # a receptive field, not a leak


def test_conditioning_at_the_grid_above_needs_a_whole_ratio_between_the_grids():
    config = vqvae2.PriorConfig(channels=8, layers=1, embed_dim=4, cond_channels=4, cond_res_blocks=1,
                                cond_resolution="above")
    with pytest.raises(ValueError, match="grid 6x6 to be a whole multiple of the grid above, 4x4"):
        PixelCNNPrior(config, num_codes=16, shape=(6, 6), cond_shapes=[(4, 4)])
    with pytest.raises(ValueError, match="prior.cond_resolution must be one of 'level', 'above', got 'below'"):
        vqvae2.PriorConfig(cond_resolution="below")


def test_class_labels_change_the_logits():
    prior, codes, cond, labels = prior_and_inputs("top-class-conditional")
    with torch.no_grad():
        assert not torch.allclose(prior(codes, cond, labels), prior(codes, cond, labels.flip(0)))


def test_missing_or_unexpected_conditioning_is_a_clear_error():
    prior, codes, cond, labels = prior_and_inputs("bottom-given-top-class-conditional")
    with pytest.raises(ValueError, match="cond_codes"):
        prior(codes, None, labels)
    with pytest.raises(ValueError, match="pass labels"):
        prior(codes, cond, None)
    top, top_codes, _, _ = prior_and_inputs("top-attention")
    with pytest.raises(ValueError, match="not class-conditional"):
        top(top_codes, None, torch.tensor([1, 2]))


def test_a_prior_learns_a_structured_code_distribution():
    # Codes that copy the left neighbour: an autoregressive model can predict every
    # position but the first of each row, so the NLL falls far below log(K).
    torch.manual_seed(0)
    config = vqvae2.preset("smoke", {"num_classes": 0})
    prior = vqvae2.build_prior(config, 0)
    optimizer, _ = vqvae2.make_optimizer(prior, config.train_prior)
    first = torch.randint(config.autoencoder.codebook_size, (256, 4, 1))
    codes = first.expand(256, 4, 4).contiguous()
    losses = [vqvae2.prior_step(prior, optimizer, codes[i % 8 * 32:(i % 8 + 1) * 32])["loss"].item() for i in range(120)]
    assert losses[0] > 3.0  # about log(32) = 3.47 at the start
    # the first column is unpredictable: 4 of 16 positions at log(32) -> about 0.87 nats
    assert sum(losses[-10:]) / 10 < 1.3


def test_bits_per_code_is_nats_over_ln2():
    assert vqvae2.bits_per_code(torch.tensor(2.0)).item() == pytest.approx(2.0 / 0.6931471805599453)


def test_prior_rebuilds_from_a_checkpoint_with_the_same_outputs(tmp_path):
    prior, codes, cond, labels = prior_and_inputs("bottom-given-top-class-conditional")
    path = tmp_path / "prior.pt"
    torch.save(vqvae2.to_checkpoint(prior), path)
    rebuilt = vqvae2.from_checkpoint(torch.load(path, weights_only=True)).eval()
    assert isinstance(rebuilt, PixelCNNPrior)
    with torch.no_grad():
        assert torch.equal(rebuilt(codes, cond, labels), prior(codes, cond, labels))
