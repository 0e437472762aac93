"""Load generator against a live `lowbit serve`: throughput and latency with 1, 2, 4, 8, 16 concurrent clients.

    python bench/serve_load.py                          # the bundled SmolLM2-135M, --parallel 8
    python bench/serve_load.py --shape llama3.2-1b      # a random-weight 4-bit model of Llama-3.2-1B's shape
    python bench/serve_load.py --soak 1000              # then 1,000 mixed requests (streaming or not, some
                                                        # cancelled), checking errors, the server's RSS and
                                                        # the keys/values its slots hold (/metrics)

The server runs in its own process (`lowbit serve --port P`), so its RSS is its own. Each client sends
``--requests`` chat requests one after another (greedy, ``--max-tokens`` each, streamed so the time to first token is
seen); all clients start together. Printed per client count: aggregate decode throughput (completion tokens / wall
time), the mean per-client throughput, time to first token p50/p95, and the server's RSS (VmRSS) after the round.
Ratios against one client are within one run (the same server process).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

QUESTIONS = [
    "What is the capital of France?", "Name three colors.", "Write a haiku about the sea.", "Who wrote Hamlet?",
    "How do I sort a list in Python?", "Tell me a joke.", "Describe a cat.", "What is gravity?", "Name a planet.",
    "Why is the sky blue?", "What is a noun?", "What is photosynthesis?", "Explain rain.", "What is a prime?",
    "Who painted the Mona Lisa?", "Describe the moon.",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def random_model(shape: str, workdir: Path, embed_bits: int | None) -> Path:
    """A random-weight 4-bit container of ``shape`` carrying the bundled model's tokenizer (to be served by text), in
    the layout `lowbit convert --bits 4` writes (groups of 32, the embedding at its default width), or with the
    embedding (the tied head of a 1B model: a quarter of its weights) at ``embed_bits``."""
    from lowbit.convert.converter import ConvertOptions
    from lowbit.formats.reader import Container
    from lowbit.runtime.engine import default_model_path
    from lowbit.runtime.measure.bench_model import build_random_container

    out = workdir / f"{shape}-q4-e{embed_bits or 'default'}-tok.lowbit"
    if not out.exists():
        c = Container(default_model_path())
        build_random_container(shape, ConvertOptions(bits=4, embed_bits=embed_bits), out,
                               tokenizer=(c.meta["tokenizer"], c.blobs()))  # fmt: skip
    return out


class Server:
    def __init__(self, model: Path | None, parallel: int, threads: int | None, cache_ram: int | None = None):
        self.port = free_port()
        cmd = [sys.executable, "-m", "lowbit.runtime.cli", "serve", "--port", str(self.port),
               "--parallel", str(parallel), "--model-name", "m"]  # fmt: skip
        if model is not None:
            cmd.insert(4, str(model))
        if threads:
            cmd += ["--threads", str(threads)]
        if cache_ram is not None:
            cmd += ["--cache-ram", str(cache_ram)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     cwd=tempfile.gettempdir())  # fmt: skip
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def chat(client: httpx.Client, question: str, max_tokens: int, every_token: bool = False):
    """(time to first token, completion tokens, seconds) of one streamed greedy chat request of exactly max_tokens
    tokens. ``every_token``: ask for logprobs, so that tokens without text (a random model's) still send a chunk."""
    body = {"model": "m", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}  # fmt: skip
    if every_token:
        body |= {"logprobs": True, "top_logprobs": 0}
    t0 = time.perf_counter()
    first, tokens, chunks = None, 0, 0
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                chunks += 1
                if chunks == 2 and first is None:  # the first after the role chunk carries the first token
                    first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, tokens, time.perf_counter() - t0


def load_round(server: Server, clients: int, requests: int, max_tokens: int, every_token: bool) -> dict:
    def client_run(i: int) -> tuple[list[float], int, float]:
        with httpx.Client(base_url=server.base, timeout=600) as h:
            ttfts, tokens, t0 = [], 0, time.perf_counter()
            for j in range(requests):
                ttft, n, _ = chat(h, QUESTIONS[(i * requests + j) % len(QUESTIONS)], max_tokens, every_token)
                tokens += n
                if ttft is not None:
                    ttfts.append(ttft)
            return ttfts, tokens, time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client_run, range(clients)))
    wall = time.perf_counter() - t0
    ttfts = sorted(t for r in results for t in r[0])
    total = sum(r[1] for r in results)
    return dict(clients=clients, tokens=total, seconds=wall, aggregate_tps=total / wall,
                per_client_tps=statistics.mean(r[1] / r[2] for r in results),
                ttft_p50=ttfts[len(ttfts) // 2] if ttfts else None,
                ttft_p95=ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))] if ttfts else None,
                rss=rss(server.proc.pid))  # fmt: skip


def soak(server: Server, n: int) -> dict:
    """n mixed requests from 8 threads: streamed or not, chat or completions, a quarter abandoned mid-stream."""
    errors, lock = [], threading.Lock()

    def one(i: int) -> None:
        try:
            with httpx.Client(base_url=server.base, timeout=600) as h:
                kind = i % 4
                if kind == 0:
                    h.post("/v1/completions", json={"model": "m", "prompt": f"Story {i}:", "max_tokens": 16,
                                                    "temperature": 0.8}).raise_for_status()  # fmt: skip
                elif kind == 1:
                    chat(h, QUESTIONS[i % len(QUESTIONS)], 16)
                elif kind == 2:
                    body = {"model": "m", "prompt": "Count: 1, 2, 3,", "max_tokens": 400, "stream": True}
                    with h.stream("POST", "/v1/completions", json=body) as r:
                        lines = r.iter_lines()
                        for _ in range(4):
                            next(lines)
                else:
                    h.post("/v1/chat/completions", json={"model": "m", "max_tokens": 12, "seed": i,
                                                         "messages": [{"role": "user", "content": f"Hi {i}"}]}
                           ).raise_for_status()  # fmt: skip
        except Exception as e:  # noqa: BLE001 - counted and reported
            with lock:
                errors.append(repr(e))

    samples, held = [], []
    with ThreadPoolExecutor(8) as pool:
        for start in range(0, n, 100):
            list(pool.map(one, range(start, min(n, start + 100))))
            samples.append(rss(server.proc.pid))
            held.append(kv_held(server))
    return dict(requests=n, errors=len(errors), first_error=errors[0] if errors else None,
                rss_mb=[s >> 20 for s in samples], kv_mb=[h >> 20 for h in held])  # fmt: skip


def kv_held(server: Server) -> int:
    """Bytes of keys/values the server's slots hold (its /metrics gauge)."""
    text = httpx.get(f"{server.base}/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith("lowbit_kv_cache_bytes "):
            return int(float(line.split()[1]))
    raise SystemExit("the server's /metrics has no lowbit_kv_cache_bytes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None, help="a .lowbit file (default: the bundled model)")
    ap.add_argument("--shape", default=None, help="serve a random-weight 4-bit model of this shape instead")
    ap.add_argument("--embed-bits", type=int, default=None,
                    help="with --shape: the embedding's width (default: lowbit convert's)")  # fmt: skip
    ap.add_argument("--clients", default="1,2,4,8,16")
    ap.add_argument("--requests", type=int, default=3, help="requests per client per round (default 3)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--soak", type=int, default=0, help="then this many mixed requests (default none)")
    ap.add_argument("--cache-ram", type=int, default=None, metavar="MIB",
                    help="the server's --cache-ram (default: its own)")  # fmt: skip
    ap.add_argument("--workdir", default="~/.cache/lowbit/bench")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    model = Path(a.model) if a.model else None
    if a.shape:
        workdir = Path(os.path.expanduser(a.workdir))
        workdir.mkdir(parents=True, exist_ok=True)
        model = random_model(a.shape, workdir, a.embed_bits)
    server = Server(model, a.parallel, a.threads, a.cache_ram)
    try:
        chat(httpx.Client(base_url=server.base, timeout=600), "Hello", 8)  # warm: kernels compiled
        rows = [load_round(server, int(c), a.requests, a.max_tokens, a.shape is not None) for c in a.clients.split(",")]
        soaked = soak(server, a.soak) if a.soak else None
    finally:
        server.close()
    if a.json:
        print(json.dumps({"rounds": rows, "soak": soaked}, indent=1))
        return
    base = rows[0]["aggregate_tps"]
    print(f"model: {model or 'bundled SmolLM2-135M'}, --parallel {a.parallel}, {a.requests} requests per client, "
          f"max_tokens {a.max_tokens}")  # fmt: skip
    print("| clients | tokens | aggregate tok/s | vs 1 client | per-client tok/s | TTFT p50 s | TTFT p95 s "
          "| server RSS MB |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["aggregate_tps"] / base
        print(f"| {r['clients']} | {r['tokens']} | {r['aggregate_tps']:.1f} | {ratio:.2f}x | {r['per_client_tps']:.1f} "
              f"| {r['ttft_p50']:.3f} | {r['ttft_p95']:.3f} | {r['rss'] >> 20} |")  # fmt: skip
    if soaked:
        print(f"soak: {soaked['requests']} requests, {soaked['errors']} errors, server RSS MB per 100: "
              f"{soaked['rss_mb']}; KV cache held MB per 100: {soaked['kv_mb']}"
              + (f"; first error: {soaked['first_error']}" if soaked["errors"] else ""))  # fmt: skip


if __name__ == "__main__":
    main()
