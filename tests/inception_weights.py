"""Inception-v3 weights for tests that never reach the internet: torch-fidelity's own module's
state dict (random values, the right names and shapes), served from 127.0.0.1."""
from __future__ import annotations

import http.server
import io
import socket
import threading
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from local_servers import free_port

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's release file


def random_inception_weights(path: Path) -> Path:
    """torch-fidelity's Inception-v3 as built, before it loads its weights: its default
    initialisation, saved as the release file is (a state dict, ~95 MB)."""

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # keep the random initialisation
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    torch.manual_seed(0)
    module = Unloaded("random", ["2048"], feature_extractor_weights_path=empty)
    torch.save(module.state_dict(), path)
    return path


class WeightsServer:
    """An HTTP server on 127.0.0.1 serving `files` (URL path -> local file), counting the
    GET requests it answers; any other path is a 404."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files, self.requests = files, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                server.requests.append(self.path)
                if self.path not in server.files:
                    self.send_error(404)
                    return
                data = server.files[self.path].read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:  # quiet: pytest shows what fails
                pass

        self.port = free_port()
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> WeightsServer:
        threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.http.shutdown()
        self.http.server_close()


def loopback_only(monkeypatch) -> None:
    """Any connection but one to 127.0.0.1 fails the test: nothing reaches the internet."""

    def guarded(real):
        def connect(self, address, *rest):
            if not (isinstance(address, tuple) and address[0] in ("127.0.0.1", "::1")):
                raise AssertionError(f"network access attempted: {address}")
            return real(self, address, *rest)
        return connect

    monkeypatch.setattr(socket.socket, "connect", guarded(socket.socket.connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(socket.socket.connect_ex))
