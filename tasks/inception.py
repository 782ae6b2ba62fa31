"""torch-fidelity's Inception-v3 weights on this machine: found, fetched once, checked.

The weights live where torch-fidelity keeps them, `$TORCH_HOME/hub/checkpoints/` under
the name of its release file (`inception_cache_path()`), or wherever the config's
`evaluate.inception_weights` names. A missing cached file is fetched from torch-fidelity's
URL, or from `$VQVAE2_INCEPTION_URL` (a mirror, or `file://` on a machine without the
internet), once: afterwards the cache has it and nothing asks the network again. Where
the URL does not answer, the error is one line naming the file and the URL.

    path = inception_weights("inception", configured=None, alternatives="features='domain'")
"""
from __future__ import annotations

import contextlib
import http.client
import io
import os
import pickle
import shutil
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from functools import cache
from urllib.parse import urlparse

import torch
import torch.hub
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from storage.checkpoints import load_checkpoint
from storage.fsutil import redact

INCEPTION_WEIGHTS_FIELD = "evaluate.inception_weights"  # the pipeline config field naming a custom weights file
# Where to fetch from: a machine setting, not a config field, since where a file can be
# fetched from decides nothing about what is measured (and tests point it at 127.0.0.1).
INCEPTION_URL_VARIABLE = "VQVAE2_INCEPTION_URL"
FETCH_TIMEOUT_S = 60  # per connection attempt and per read: a silent firewall fails in a minute, not hours
WEIGHTS_NAME = os.path.basename(urlparse(URL_INCEPTION_V3).path)  # weights-inception-2015-12-05-6726825d.pth


class InceptionWeightsMissing(FileNotFoundError):
    """Inception features asked for (or picked by `auto`) on a machine without the weights
    file, which could not be fetched."""


def inception_url() -> str:
    """Where a missing cached file is fetched from: `$VQVAE2_INCEPTION_URL`, else torch-fidelity's release."""
    return os.environ.get(INCEPTION_URL_VARIABLE) or URL_INCEPTION_V3


def inception_cache_path() -> str:
    """Where torch-fidelity keeps the Inception weights it downloads (and looks first):
    torch.hub's checkpoint folder, $TORCH_HOME/hub/checkpoints, plus the release's file name.
    Only computed: calling this never downloads."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_NAME)


def missing_inception(choice: str, configured: str | None, alternatives: str,
                      unreachable: str | None = None) -> InceptionWeightsMissing:
    """The one-line error for weights that are neither where `configured` (or the cache) says nor
    fetchable (`unreachable`: why the fetch failed), telling where to put them, or which other
    feature spaces (`alternatives`: "features='domain' or 'auto'") need no Inception."""
    url = redact(inception_url())
    if configured:
        where = (f": {INCEPTION_WEIGHTS_FIELD} is {configured!r}, which does not exist: put the file there, or unset "
                 f"{INCEPTION_WEIGHTS_FIELD} to fetch it from {url} into torch-fidelity's cache "
                 f"{inception_cache_path()}")
    else:
        where = (f" and could not be fetched from {url} ({unreachable}): put that file at {inception_cache_path()} "
                 f"(torch-fidelity's cache), or set {INCEPTION_WEIGHTS_FIELD} to its path, or "
                 f"{INCEPTION_URL_VARIABLE} to a URL that serves it")
    return InceptionWeightsMissing(
        f"features={choice!r} needs torch-fidelity's Inception-v3 weights {WEIGHTS_NAME}, which are not on this "
        f"machine{where}. Or use {alternatives} to measure with the pipeline's own features network"
    )


def inception_weights(choice: str, configured: str | None, alternatives: str) -> str:
    """The local path of the Inception-v3 weights, checked: `configured` (never fetched: the
    user's own file), else torch-fidelity's cached file, fetched first where it is missing.
    `choice` and `alternatives` word the error (see `missing_inception`)."""
    if configured:
        if not os.path.isfile(configured):
            raise missing_inception(choice, configured, alternatives)
        check_inception_weights(configured)
        return configured
    path = inception_cache_path()
    if not os.path.isfile(path):
        _fetch(path, choice, alternatives)
    check_inception_weights(path)
    return path


def _fetch(path: str, choice: str, alternatives: str) -> None:
    """`inception_url()` into `path`, through a private partial file that takes the name only
    once it is checked: a concurrent run, an interrupted download or a server's error page
    never leaves a file there that looks like the weights."""
    url = inception_url()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{uuid.uuid4().hex}.partial"
    try:
        with open(partial, "wb") as out:
            try:
                request = urllib.request.Request(url, headers={"User-Agent": "vqvae2 (torch-fidelity weights)"})
                with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response:
                    shutil.copyfileobj(response, out, 1 << 20)
            except (OSError, ValueError, http.client.HTTPException) as err:  # URLError, HTTPError: OSErrors
                raise missing_inception(choice, None, alternatives, unreachable=_why(err)) from None
        problem = _not_inception(partial)
        if problem:
            raise ValueError(f"{redact(url)} served a file that is not torch-fidelity's Inception-v3 weights "
                             f"({problem}), so nothing was cached at {path}: fix {INCEPTION_URL_VARIABLE} or put "
                             f"{URL_INCEPTION_V3} there by hand")
        os.replace(partial, path)
        _CHECKED.add(_identity(path))  # checked as the partial file: the same bytes
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)


def _why(err: Exception) -> str:
    """A failed fetch in a few words: "HTTP Error 404: Not Found", "[Errno 111] Connection refused"."""
    reason = err if isinstance(err, urllib.error.HTTPError) else getattr(err, "reason", None) or err
    return " ".join(str(reason).split()) or type(err).__name__


@cache
def inception_layout() -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor torch-fidelity's Inception-v3 loads, from its own
    module built without weights on the meta device (no memory, no download)."""

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # type: ignore[override]  # the layout needs no weights
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.device("meta"):
        module = Unloaded("layout", ["2048"], feature_extractor_weights_path=empty)
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}


# A weights file already checked, by path, size and modification time: the pipeline's check
# and the evaluation each ask, and loading 95 MB once is enough.
_CHECKED: set[tuple[str, int, int]] = set()


def check_inception_weights(path: str) -> None:
    """`path` holds torch-fidelity's Inception-v3 state dict: every tensor of its module, by name
    and shape. A truncated download or an HTML error page saved under the right name fails here,
    not halfway through an evaluation; and since torch-fidelity loads it with weights_only=False,
    only a file that loads with weights_only=True reaches it."""
    identity = _identity(path)
    if identity in _CHECKED:
        return
    problem = _not_inception(path)
    if problem:
        raise ValueError(f"{path}: not torch-fidelity's Inception-v3 weights ({problem}); replace it with "
                         f"{URL_INCEPTION_V3}, or delete it to fetch it again")
    _CHECKED.add(identity)


def _identity(path: str) -> tuple[str, int, int]:
    stat = os.stat(path)
    return os.path.realpath(path), stat.st_size, stat.st_mtime_ns


def _not_inception(path: str) -> str | None:
    """What makes `path` not the weights, in a few words; None when it is them."""
    try:
        state = load_checkpoint(path)
    except (ValueError, pickle.UnpicklingError) as err:  # load_checkpoint maps torch's other load errors to ValueError
        return f"not a loadable checkpoint: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    if not isinstance(state, Mapping):
        return f"a {type(state).__name__}, not a state dict"
    # A BatchNorm's step counter is optional: torch fills it in for files saved without it.
    layout = {k: v for k, v in inception_layout().items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in layout if k not in state]
    unknown = [k for k in state if k not in inception_layout()]
    shapes = [k for k in layout if k in state and tuple(getattr(state[k], "shape", ())) != layout[k]]
    for what, keys in (("missing", missing), ("unexpected", unknown), ("of another shape", shapes)):
        if keys:
            return f"{len(keys)} tensors {what}, e.g. {keys[0]!r}"
    return None
