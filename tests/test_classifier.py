import pytest
import torch
import torch.nn.functional as F

import vqvae2


def test_smoke_classifier_learns_real_fashion_mnist(fashion_mnist_test_split):
    images, labels = fashion_mnist_test_split
    x = F.interpolate(torch.from_numpy(images[:2048]).float().div(255).unsqueeze(1), size=(16, 16),
                      mode="bilinear", antialias=True)
    y = torch.from_numpy(labels[:2048].astype("int64"))
    vqvae2.seed_everything(0)
    config = vqvae2.preset("smoke")
    model = vqvae2.build_classifier(config)
    optimizer, _ = vqvae2.make_optimizer(model, config.train_classifier)
    for step in range(60):
        i = step * 32 % 1536
        vqvae2.classifier_step(model, optimizer, x[i:i + 32], y[i:i + 32])
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[1536:]).argmax(1) == y[1536:]).float().mean().item()
    assert accuracy > 0.5  # chance is 0.1
    assert model.features(x[:4]).shape == (4, model.feature_dim)


def test_a_classifier_needs_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        vqvae2.build_classifier(vqvae2.preset("smoke", {"num_classes": 0}))
