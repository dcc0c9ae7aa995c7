"""Load test of ``lmforge serve`` on loopback: concurrent clients against the OpenAI-compatible server.

Starts ``lmforge serve`` in a subprocess (so the clients do not share its interpreter) on 127.0.0.1 with a
free port, for a small random transformer (or ``--model DIR``), then runs, side by side in one run:

- ``sequential``: one client, one request at a time (the baseline);
- ``at-limit``: ``--concurrency`` clients (the server's ``--max-concurrency``): batching, no failures allowed;
- ``at-limit-stream``: the same with ``"stream": true`` (adds time to first token);
- ``over-limit``: ``--over`` x that many clients: some requests must get 429, none any other error.

Every client (asyncio + httpx) sends greedy completions of ``--max-tokens`` tokens for prompts from a fixed
list; a greedy completion must equal the sequential one of the same prompt. Latency percentiles are over the
successful requests; tokens/s is completion tokens over the scenario's wall time; "speedup" is its tokens/s
over the sequential one's (machines are shared and noisy: compare within a run).

    python benchmarks/serve_load.py [--requests 48 --concurrency 8 --over 3 --max-tokens 32]

Prints a table and a final ``RESULT {json}`` line; exits 1 when a scenario breaks its expectation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

PROMPTS = [
    "Once upon a time",
    "The quick brown fox",
    "def main():\n",
    "In the beginning",
    "Hello, world",
    "A language model",
    "x = 1\ny = ",
    "It was a dark and stormy night",
]


def make_model(root: Path, width: int, layers: int, context: int) -> Path:
    import torch

    from lmforge.config import build_config
    from lmforge.data.tokenizer import char_tokenizer
    from lmforge.models import build_model
    from lmforge.runs import save_checkpoint

    torch.manual_seed(0)
    tok = char_tokenizer([string.printable])
    cfg = build_config(
        {
            "model": {
                "family": "transformer",
                "n_layer": layers,
                "d_model": width,
                "n_head": max(1, width // 32),
                "vocab_size": tok.vocab_size,
                "max_seq_len": context,
                "init_std": 0.3,
            },
            "data": {"block_size": context},
        }
    )
    return save_checkpoint(root / "bench-model", model=build_model(cfg.model), config_yaml=cfg.to_yaml(), tokenizer=tok)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


async def one_request(client: httpx.AsyncClient, prompt: str, args: argparse.Namespace, stream: bool) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0}
    t0 = time.perf_counter()
    if not stream:
        r = await client.post("/v1/completions", json=body)
        out: dict[str, Any] = {"status": r.status_code, "latency": time.perf_counter() - t0}
        if r.status_code == 200:
            data = r.json()
            out.update(text=data["choices"][0]["text"], tokens=data["usage"]["completion_tokens"])
        return out
    body.update(stream=True, stream_options={"include_usage": True})
    parts: list[str] = []
    first = None
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "latency": time.perf_counter() - t0}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"status": 599, "latency": time.perf_counter() - t0}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"]:
                if first is None:
                    first = time.perf_counter() - t0
                parts.append(chunk["choices"][0]["text"])
    return {"status": 200, "latency": time.perf_counter() - t0, "ttft": first, "text": "".join(parts), "tokens": tokens}


async def scenario(url: str, clients: int, requests: int, args: argparse.Namespace, stream: bool) -> dict[str, Any]:
    """``clients`` workers share ``requests`` requests (prompts round-robin); returns per-request records."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    records: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as client:

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    rec = await one_request(client, PROMPTS[i % len(PROMPTS)], args, stream)
                except httpx.HTTPError as err:
                    rec = {"status": f"{type(err).__name__}", "latency": float("nan")}
                rec["prompt"] = i % len(PROMPTS)
                records.append(rec)

        before = (await client.get("/health")).json()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
        after = (await client.get("/health")).json()
    return {
        "records": records,
        "wall": wall,
        "calls": after["generate_calls"] - before["generate_calls"],
        "served": after["requests_generated"] - before["requests_generated"],
    }


def summarize(name: str, clients: int, res: dict[str, Any], reference: dict[int, str]) -> dict[str, Any]:
    recs = res["records"]
    ok = [r for r in recs if r["status"] == 200]
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r.get("ttft") is not None]
    tokens = sum(r["tokens"] for r in ok)
    mismatched = sum(1 for r in ok if r["prompt"] in reference and r["text"] != reference[r["prompt"]])
    return {
        "scenario": name,
        "clients": clients,
        "requests": len(recs),
        "ok": len(ok),
        "429": sum(1 for r in recs if r["status"] == 429),
        "other_errors": sum(1 for r in recs if r["status"] not in (200, 429)),
        "mismatched": mismatched,
        "p50_ms": round(1000 * percentile(lat, 0.5), 1),
        "p90_ms": round(1000 * percentile(lat, 0.9), 1),
        "p99_ms": round(1000 * percentile(lat, 0.99), 1),
        "ttft_p50_ms": round(1000 * percentile(ttft, 0.5), 1) if ttft else None,
        "tokens_per_s": round(tokens / res["wall"], 1),
        "mean_batch": round(res["served"] / res["calls"], 2) if res["calls"] else None,
        "wall_s": round(res["wall"], 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint/run dir to serve (default: a random tiny transformer)")
    ap.add_argument("--requests", type=int, default=48, help="requests per scenario")
    ap.add_argument("--concurrency", type=int, default=8, help="the server's --max-concurrency, and the clients")
    ap.add_argument("--over", type=int, default=3, help="over-limit scenario: this many times more clients")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=120.0, help="client timeout (s)")
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else make_model(Path(tmp), args.width, args.layers, args.context)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable,
            "-m",
            "lmforge",
            "serve",
            str(model_dir),
            "--port",
            str(port),
            "--model-name",
            "bench",
            "--max-concurrency",
            str(args.concurrency),
            "--timeout",
            str(args.timeout),
            "--log-level",
            "error",
            "--device",
            "cpu",
            "--threads",
            str(args.threads),
        ]
        server = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    print(
                        server.stderr.read() if server.poll() is not None else "server did not start", file=sys.stderr
                    )
                    return 1
                time.sleep(0.2)

            n = args.requests
            seq = asyncio.run(scenario(url, 1, n, args, stream=False))
            reference = {}
            for r in seq["records"]:
                if r["status"] == 200:
                    reference.setdefault(r["prompt"], r["text"])
            rows = [summarize("sequential", 1, seq, reference)]
            c = args.concurrency
            rows.append(summarize("at-limit", c, asyncio.run(scenario(url, c, n, args, stream=False)), reference))
            rows.append(summarize("at-limit-stream", c, asyncio.run(scenario(url, c, n, args, stream=True)), reference))
            over = c * args.over
            rows.append(
                summarize(
                    "over-limit",
                    over,
                    asyncio.run(scenario(url, over, max(n, 2 * over), args, stream=False)),
                    reference,
                )
            )
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()

    base = rows[0]["tokens_per_s"] or float("nan")
    for r in rows:
        r["speedup"] = round(r["tokens_per_s"] / base, 2) if base == base and base > 0 else None
    checks = {
        "sequential_ok": rows[0]["ok"] == rows[0]["requests"] and rows[0]["mismatched"] == 0,
        "at_limit_no_failures": all(r["ok"] == r["requests"] and r["mismatched"] == 0 for r in rows[1:3]),
        "over_limit_429s_only": rows[3]["429"] > 0 and rows[3]["other_errors"] == 0 and rows[3]["mismatched"] == 0,
    }
    model = args.model or f"random transformer {args.layers}x{args.width}, context {args.context}"
    print(
        f"model: {model}; {args.max_tokens} new tokens per greedy request; server --max-concurrency {args.concurrency}"
    )
    header = (
        f"{'scenario':<16}{'clients':>8}{'reqs':>6}{'ok':>5}{'429':>5}{'err':>5}{'p50 ms':>9}{'p90 ms':>9}"
        f"{'p99 ms':>9}{'ttft ms':>9}{'tok/s':>9}{'speedup':>9}{'batch':>7}"
    )
    print(header)
    for r in rows:
        ttft = f"{r['ttft_p50_ms']:.1f}" if r["ttft_p50_ms"] is not None else "-"
        batch = f"{r['mean_batch']:.2f}" if r["mean_batch"] is not None else "-"
        print(
            f"{r['scenario']:<16}{r['clients']:>8}{r['requests']:>6}{r['ok']:>5}{r['429']:>5}"
            f"{r['other_errors'] + r['mismatched']:>5}{r['p50_ms']:>9.1f}{r['p90_ms']:>9.1f}{r['p99_ms']:>9.1f}"
            f"{ttft:>9}{r['tokens_per_s']:>9.1f}{r['speedup']:>9.2f}{batch:>7}"
        )
    print("checks: " + ", ".join(f"{k}={'ok' if v else 'FAILED'}" for k, v in checks.items()))
    print(
        "RESULT "
        + json.dumps(
            {
                "benchmark": "serve_load",
                "max_tokens": args.max_tokens,
                "max_concurrency": args.concurrency,
                "scenarios": rows,
                "checks": checks,
            }
        )
    )
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
