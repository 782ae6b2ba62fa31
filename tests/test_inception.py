"""Inception features when asked for, or picked by `auto` for RGB images of 64 px and more:
torch-fidelity's weights fetched once into its cache from a URL setting, here a server on
127.0.0.1 serving torch-fidelity's own module's state dict (random values). Nothing else
is reachable: any other connection fails the test."""
import glob
import logging
import os

import pytest
import torch
from torch_fidelity.utils import create_feature_extractor

from inception_weights import WEIGHTS_NAME, WeightsServer, loopback_only, random_inception_weights
from local_servers import free_port
from tasks.config import pipeline_config
from tasks.fidelity import ImageKind, feature_space, resolve_extractor
from tasks.inception import INCEPTION_URL_VARIABLE, InceptionWeightsMissing, inception_cache_path
from tasks.stages import EVALUATE, stage_keys
from tasks.stages.train_classifier import classifier_roles

DIGEST = "sha256:" + "0" * 64
PATH = f"/torch-fidelity/{WEIGHTS_NAME}"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return random_inception_weights(tmp_path_factory.mktemp("served") / WEIGHTS_NAME)


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """An empty TORCH_HOME, and no connection but to 127.0.0.1."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    loopback_only(monkeypatch)


@pytest.fixture
def server(weights, tmp_path, monkeypatch):
    """Serves the weights at PATH, an error page and a state dict of another network; the URL setting names PATH."""
    page = tmp_path / "page.html"
    page.write_text("<html>rate limited</html>")
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, other)
    with WeightsServer({PATH: weights, "/page.html": page, "/other.pth": other}) as served:
        monkeypatch.setenv(INCEPTION_URL_VARIABLE, served.url(PATH))
        yield served


def test_inception_weights_are_fetched_once_into_torch_fidelitys_cache_and_torch_fidelity_loads_them(server):
    extractor = resolve_extractor("inception")
    cached = inception_cache_path()
    assert extractor.weights == cached and os.path.isfile(cached) and server.requests == [PATH]
    assert os.listdir(os.path.dirname(cached)) == [WEIGHTS_NAME]  # no partial file left beside it
    # Checked once: another use and the pipeline's check find the cache.
    assert resolve_extractor("inception").weights == cached
    EVALUATE.check(pipeline_config("imagenet-256"), None)
    assert server.requests == [PATH]
    # torch-fidelity builds its extractor from the file it is handed (its strict load: every
    # name and shape); it would fetch its own URL otherwise, a connection this test refuses.
    network = create_feature_extractor(extractor.name, [extractor.feature_layers["fid"]], cuda=False,
                                       feature_extractor_weights_path=extractor.weights)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    (features,) = network(images)
    assert features.shape == (2, 2048) and torch.isfinite(features).all() and server.requests == [PATH]


def test_an_unreachable_url_fails_in_one_line_naming_the_file_and_the_url(monkeypatch):
    url = f"http://127.0.0.1:{free_port()}/{WEIGHTS_NAME}"  # nothing listens there
    monkeypatch.setenv(INCEPTION_URL_VARIABLE, url)
    with pytest.raises(InceptionWeightsMissing) as error:
        resolve_extractor("inception")
    message = str(error.value)
    assert "\n" not in message and url in message and inception_cache_path() in message
    assert message.startswith(f"features='inception' needs torch-fidelity's Inception-v3 weights {WEIGHTS_NAME}")
    assert "Connection refused" in message and "evaluate.inception_weights" in message
    assert glob.glob(f"{inception_cache_path()}*") == []  # nothing cached, no partial file left
    # `auto` picked it from the config: the run stops at its check, before any training,
    # pointing to the pipeline's own features ('auto' would pick Inception again).
    for preset, instead in (("imagenet-256", "'domain'"), ("ffhq-1024", "'self-supervised'")):
        with pytest.raises(InceptionWeightsMissing, match=rf"features='auto' needs .* Or use features={instead} to"):
            EVALUATE.check(pipeline_config(preset), None)


def test_what_a_url_serves_is_cached_only_if_it_is_the_weights(server, monkeypatch):
    for path, problem in (("/page.html", "not a loadable checkpoint"), ("/other.pth", "tensors missing"),
                          ("/missing.pth", "HTTP Error 404")):
        monkeypatch.setenv(INCEPTION_URL_VARIABLE, server.url(path))
        with pytest.raises((ValueError, InceptionWeightsMissing), match=problem) as error:
            resolve_extractor("inception")
        assert "\n" not in str(error.value) and server.url(path) in str(error.value)
        assert not os.path.exists(inception_cache_path())
    assert server.requests == ["/page.html", "/other.pth", "/missing.pth"]
    # A bad file already in the cache is named, not replaced behind the user's back.
    with open(inception_cache_path(), "w") as page:
        page.write("<html>saved by hand</html>")
    with pytest.raises(ValueError, match=r"not torch-fidelity's Inception-v3 weights .* delete it to fetch it again"):
        resolve_extractor("inception")
    assert server.requests == ["/page.html", "/other.pth", "/missing.pth"]


@pytest.mark.parametrize("preset, overrides, space", [
    ("imagenet-256", {}, "inception"),
    ("ffhq-1024", {}, "inception"),
    ("fashion-mnist", {"image_channels": 3, "image_size": 64}, "inception"),  # one's own RGB images, 64 px
    ("fashion-mnist", {"image_channels": 3}, "domain"),  # RGB, but 32 px
    ("fashion-mnist", {"image_size": 64}, "domain"),  # 64 px, but gray
    ("fashion-mnist", {}, "domain"),
    ("fashion-mnist-gpu", {}, "domain"),
    ("smoke", {"num_classes": 0}, "self-supervised"),
])
def test_auto_decides_from_the_config_alone(server, preset, overrides, space):
    config = pipeline_config(preset, storage={"root": "/tmp/vqvae2-keys"}, overrides=overrides)
    assert feature_space(config) == space
    assert ("features" in classifier_roles(config)) == (space != "inception")
    keys = stage_keys(config, DIGEST)
    EVALUATE.check(config, None)  # fetches where Inception is picked, asks nothing where not
    assert server.requests == ([PATH] if space == "inception" else [])
    assert stage_keys(config, DIGEST) == keys  # a cached file changes no key


def test_auto_says_in_one_line_which_features_it_picked_and_why(server, tmp_path, caplog):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"only its existence is checked here")
    with caplog.at_level(logging.INFO, logger="vqvae2"):
        picked = resolve_extractor("auto", images=ImageKind(3, 256, True))
        own = resolve_extractor("auto", images=ImageKind(1, 32, True), domain_checkpoint=str(checkpoint))
    assert (picked.kind, own.kind) == ("inception", "domain")
    assert picked.summary() == ("fidelity features: inception (inception-v3-compat), picked by features=auto because "
                                "the config's images are RGB images of 256 px (auto takes Inception for RGB of 64 px "
                                "and more: FIDs comparable with published ones)")
    assert "because the config's images are gray images of 32 px, not RGB of 64 px and more" in own.summary()
    assert resolve_extractor("inception").summary() == "fidelity features: inception (inception-v3-compat)"
    assert [r.getMessage().split(" because")[0] for r in caplog.records] == [
        "features=auto: using the inception extractor (inception-v3-compat)",
        "features=auto: using the domain extractor (vqvae2-domain-classifier)"]
