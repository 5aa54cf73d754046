"""A bounded load test of npsam serve on 127.0.0.1 (scripts/load_serve.py):
concurrent clients, each its own session on one of two photos, making pairs
of prompts (a new click, a background click refining it); no error and every
answer exactly the one the same prompt gets alone. CI runs a smaller version
(4 clients x 10 prompts); ``python scripts/load_serve.py`` runs 8 x 50."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from npsam.tools.serve import build_server, start_in_thread

ROOT = Path(__file__).resolve().parent.parent


def _load_script():
    spec = importlib.util.spec_from_file_location("load_serve", ROOT / "scripts" / "load_serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def url():
    server = build_server([str(ROOT / "assets" / "images" / "truck.jpg"), str(ROOT / "assets" / "images" / "dog.jpg")])
    address, uv, thread = start_in_thread(server, "127.0.0.1", 0)
    yield address
    uv.should_exit = True
    thread.join(timeout=30)
    server.close()


def test_concurrent_clients_get_their_own_results(url):
    script = _load_script()
    figures = script.load(url, clients=4, prompts=10, timeout=600)
    print("\n" + script.report(figures))
    assert figures["prompts"] == 40 and figures["p50_ms"] > 0

