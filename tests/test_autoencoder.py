import pytest
import torch
import torch.nn.functional as F

import vqvae2


def _as_model_images(images_uint8, size: int) -> torch.Tensor:
    """Real 28x28 uint8 images -> (N, 1, size, size) floats in [0, 1]."""
    x = torch.from_numpy(images_uint8).float().div(255).unsqueeze(1)
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


@pytest.fixture(scope="module")
def smoke_images(fashion_mnist_test_split):
    images, labels = fashion_mnist_test_split
    return _as_model_images(images[:1024], 16), torch.from_numpy(labels[:1024].astype("int64"))


def test_encode_then_decode_codes_gives_the_forward_reconstruction(smoke_images):
    torch.manual_seed(0)
    model = vqvae2.build_autoencoder(vqvae2.preset("smoke")).eval()
    x = smoke_images[0][:8]
    codes = model.encode(x)
    assert [tuple(c.shape) for c in codes] == [(8, 4, 4), (8, 8, 8)]
    assert all(c.dtype == torch.long for c in codes)
    with torch.no_grad():
        out = model(x)
        assert all(torch.equal(a, b) for a, b in zip(codes, out.codes))
        assert torch.allclose(model.decode_codes(codes), out.reconstruction, atol=1e-5)


def test_decode_codes_rejects_the_wrong_number_of_levels():
    model = vqvae2.build_autoencoder(vqvae2.preset("smoke"))
    with pytest.raises(ValueError, match="needs 2 code grids"):
        model.decode_codes([torch.zeros(1, 4, 4, dtype=torch.long)])


def test_three_levels_encode_and_decode():
    config = vqvae2.preset("smoke", {
        "image_size": 32, "autoencoder.strides": [2, 2, 2],
        "priors": [{"channels": 8, "layers": 1, "kernel_size": 3}] * 3,
    })
    model = vqvae2.build_autoencoder(config).eval()
    codes = model.encode(torch.rand(2, 1, 32, 32))
    assert [tuple(c.shape[1:]) for c in codes] == [(4, 4), (8, 8), (16, 16)]
    assert model.decode_codes(codes).shape == (2, 1, 32, 32)


def test_smoke_autoencoder_learns_real_fashion_mnist(smoke_images):
    vqvae2.seed_everything(0)
    config = vqvae2.preset("smoke")
    model = vqvae2.build_autoencoder(config)
    optimizer, scheduler = vqvae2.make_optimizer(model, config.train_autoencoder)
    images = smoke_images[0]
    history = []
    for step in range(48):
        batch = images[(step * 32) % 1024:(step * 32) % 1024 + 32]
        history.append(vqvae2.autoencoder_step(model, optimizer, batch, scheduler=scheduler))
    first = sum(h["recon_loss"].item() for h in history[:4]) / 4
    last = sum(h["recon_loss"].item() for h in history[-4:]) / 4
    assert last < 0.5 * first, f"reconstruction loss fell only from {first:.4f} to {last:.4f}"
    assert history[-1]["usage_top"].item() > 1 and history[-1]["usage_bottom"].item() > 1
    # Held-out images reconstruct better than a constant (mean) image would.
    model.eval()
    held_out = images[-128:]
    with torch.no_grad():
        mse = F.mse_loss(model(held_out).reconstruction.clamp(0, 1), held_out).item()
    assert mse < 0.5 * held_out.var().item()


def _train_a_few_steps(seed: int, steps: int = 4) -> dict[str, torch.Tensor]:
    vqvae2.seed_everything(seed)
    config = vqvae2.preset("smoke")
    model = vqvae2.build_autoencoder(config)
    optimizer, _ = vqvae2.make_optimizer(model, config.train_autoencoder)
    data = torch.rand(steps, 8, 1, 16, 16)
    for batch in data:
        vqvae2.autoencoder_step(model, optimizer, batch)
    return model.state_dict()


def test_training_is_deterministic_under_a_seed_on_cpu():
    a, b, c = _train_a_few_steps(1), _train_a_few_steps(1), _train_a_few_steps(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_bf16_autocast_and_channels_last_steps_train_with_fp32_codebooks():
    vqvae2.seed_everything(0)
    config = vqvae2.preset("smoke")
    model = vqvae2.prepare_model(vqvae2.build_autoencoder(config), "cpu", channels_last=True)
    optimizer, _ = vqvae2.make_optimizer(model, config.train_autoencoder)
    metrics = vqvae2.autoencoder_step(model, optimizer, torch.rand(8, 1, 16, 16), amp="bf16", channels_last=True)
    assert torch.isfinite(metrics["loss"])
    for quantizer in model.quantizers:
        assert quantizer.embed.dtype == torch.float32 and torch.isfinite(quantizer.embed).all()
