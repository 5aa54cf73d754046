"""A bounded load test of ``npsam serve`` on 127.0.0.1.

    python scripts/load_serve.py                       # 8 clients x 50 prompts on truck.jpg and dog.jpg
    python scripts/load_serve.py --clients 4 --prompts 10

Starts ``npsam serve`` in its own process on a free port (or uses --url),
has every client open its own session (a browser tab) on one of two photos,
and make its prompts concurrently: pairs of a new foreground click and a
background click refining it (the shown mask fed back as mask_input).

No mixed-up results: before the concurrent run, one client computes every
distinct prompt pair alone, one request at a time; each concurrent answer
must then be that answer exactly (the same candidates' scores and mask PNGs,
the client's own photo and points). Any error, mismatch or time-out fails.
Prints p50 and p95 latency (request sent -> answer read) and throughput.

The machine's other load changes the figures: say what else ran when you
report them.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ("truck.jpg", "dog.jpg")
PAIRS_PER_CLIENT = 5  # distinct (foreground, background) pairs each client cycles through


def prompt_pairs(client: int, size: Tuple[int, int]) -> List[Tuple[List[float], List[float]]]:
    """The client's prompt pairs: a foreground point and a background point
    near it, inside a photo of size (W, H); different for every client."""
    w, h = size
    rng = np.random.default_rng(1000 + client)
    pairs = []
    for _ in range(PAIRS_PER_CLIENT):
        x, y = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h
        bx, by = min(max(x + rng.uniform(-0.1, 0.1) * w, 0), w), min(max(y + rng.uniform(-0.1, 0.1) * h, 0), h)
        pairs.append(([round(x, 1), round(y, 1), 1], [round(bx, 1), round(by, 1), 0]))
    return pairs


def _answer(view: dict) -> Tuple:
    """What must not change between runs: the candidates (scores, PNGs) and the pick."""
    return tuple((c["score"], c["png"]) for c in view["candidates"]) + (view["chosen"],)


def load(url: str, clients: int = 8, prompts: int = 50, timeout: float = 600.0) -> Dict[str, float]:
    """Run the load test against a running server; returns the figures.
    Raises AssertionError on any error or mixed-up result."""
    import httpx

    if prompts % 2:
        raise ValueError(f"prompts: expected an even number (pairs of clicks), got {prompts}")
    start = time.monotonic()
    with httpx.Client(base_url=url, timeout=timeout) as http:
        listed = {p["name"]: p for p in http.get("/api/photos").json()["photos"]}
        missing = [n for n in PHOTOS if n not in listed]
        assert not missing, f"the server offers no {missing}; start it on assets/images"
        photos = [listed[n] for n in PHOTOS]
        for p in photos:
            assert http.post(f"/api/photos/{p['id']}/embed").status_code == 202
        for p in photos:
            while http.get(f"/api/photos/{p['id']}").json()["embedding"]["state"] != "ready":
                assert time.monotonic() - start < timeout, "embedding timed out"
                time.sleep(0.1)
        # the expected answers, one request at a time
        plans = []
        expected: Dict[Tuple, Tuple] = {}
        sid = http.post("/api/sessions").json()["session"]
        for c in range(clients):
            photo = photos[c % len(photos)]
            pairs = prompt_pairs(c, (photo["width"], photo["height"]))
            plans.append((photo, pairs))
            for fg, bg in pairs:
                base = f"/api/sessions/{sid}/photos/{photo['id']}/prompt"
                first = http.post(base, json={"point": fg, "new": True}).json()
                second = http.post(base, json={"point": bg}).json()
                expected[(photo["id"], tuple(fg), None)] = _answer(first)
                expected[(photo["id"], tuple(fg), tuple(bg))] = _answer(second)

    latencies: List[float] = []
    failures: List[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(c: int) -> None:
        photo, pairs = plans[c]
        mine: List[float] = []
        try:
            with httpx.Client(base_url=url, timeout=timeout) as http:
                sid = http.post("/api/sessions").json()["session"]
                base = f"/api/sessions/{sid}/photos/{photo['id']}/prompt"
                barrier.wait()
                for i in range(prompts):
                    fg, bg = pairs[(i // 2) % len(pairs)]
                    body = {"point": fg, "new": True} if i % 2 == 0 else {"point": bg}
                    t0 = time.perf_counter()
                    r = http.post(base, json=body)
                    view = r.json()
                    mine.append(time.perf_counter() - t0)
                    if r.status_code != 200:
                        raise AssertionError(f"client {c} prompt {i}: {r.status_code} {view}")
                    key = (photo["id"], tuple(fg), None if i % 2 == 0 else tuple(bg))
                    points = [fg] if i % 2 == 0 else [fg, bg]
                    if view["photo"] != photo["id"] or view["points"] != points:
                        raise AssertionError(f"client {c} prompt {i}: got the prompt {view['points']} on "
                                             f"{view['photo']}, sent {points} on {photo['id']}")
                    if _answer(view) != expected[key]:
                        raise AssertionError(f"client {c} prompt {i}: the masks differ from the same prompt "
                                             "made alone")
        except Exception as error:  # collected, reported below
            with lock:
                failures.append(f"{type(error).__name__}: {error}")
        with lock:
            latencies.extend(mine)

    run_start = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    seconds = time.monotonic() - run_start
    assert not any(t.is_alive() for t in threads), "a client did not finish in time"
    assert not failures, "\n".join(failures[:10])
    assert len(latencies) == clients * prompts, (len(latencies), clients * prompts)
    ms = np.array(latencies) * 1000
    return {"clients": clients, "prompts": clients * prompts, "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)), "max_ms": float(ms.max()), "seconds": seconds,
            "prompts_per_s": clients * prompts / seconds}


def report(figures: Dict[str, float]) -> str:
    return (f"{figures['clients']} clients x {figures['prompts'] // figures['clients']} prompts "
            f"({figures['prompts']} on 2 photos): p50 {figures['p50_ms']:.0f} ms, p95 {figures['p95_ms']:.0f} ms, "
            f"max {figures['max_ms']:.0f} ms; {figures['prompts_per_s']:.1f} prompts/s over {figures['seconds']:.1f} s; "
            "no error, no mixed-up result")


def start_server(photos: Sequence[str]) -> Tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, "-m", "npsam", "serve", *photos, "--host", "127.0.0.1",
                                "--port", "0"], stdout=subprocess.PIPE, text=True, env=env)
    line = process.stdout.readline()
    match = re.search(r"open (http://127\.0\.0\.1:\d+/)", line)
    if not match:
        process.kill()
        raise RuntimeError(f"npsam serve did not start: {line!r}")
    return process, match.group(1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=50, help="per client (even: pairs of clicks)")
    parser.add_argument("--url", help="a running npsam serve on assets/images (default: start one)")
    args = parser.parse_args(argv)
    process = None
    url = args.url
    if url is None:
        process, url = start_server([str(ROOT / "assets" / "images" / n) for n in PHOTOS])
    try:
        print(report(load(url, args.clients, args.prompts)))
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
