"""Load test of ``lmforge serve``: continuous batching against the old per-request batching, in one run.

1. Trains a small model on the demo corpus for a few seconds (``lmforge train --data demo``: the settings of
   ``examples/demo.yaml`` with a 128-token context, 4 layers of width 128), or serves ``--model DIR``.
2. For each batching mode (``--batching per-request``, then ``continuous``) starts ``lmforge serve`` in a
   subprocess on 127.0.0.1 (1 torch thread, ``--max-concurrency`` and ``--max-batch-rows`` 64), then, when
   the ``transformers`` command exists, ``transformers serve --continuous-batching`` on the model exported by
   ``lmforge export`` (offline, CPU, 1 OpenMP thread); for each, 1, 8, 32 and 64 concurrent clients run
   closed-loop streaming clients (asyncio + httpx): each sends ``--per-client`` greedy streamed
   completions in turn, prompts of 4-60 characters and 8-64 new tokens (a fixed mix, the same for every
   server).
3. Reports per mode and client count: completion tokens/s (the server's usage counts over the level's wall
   time), time to first token (first chunk with text) p50/p99, and end-to-end latency p50. Greedy outputs
   must be equal in both modes (same prompt and length).

Goal (issue #15): at 32 clients continuous >= 3x the per-request tokens/s, and its p99 TTFT < 4x its own
1-client value. The machine is shared: both modes run side by side in this one run; compare ratios.

    python benchmarks/serve_load.py [--train-seconds 20 --per-client 3 --levels 1,8,32,64]

Prints a table and a final ``RESULT {json}`` line; exits 1 when a request fails or outputs differ.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
WORDS = (
    "Return the value of the named attribute of object. If the string is the name of one of the object's "
    "attributes, the result is the value of that attribute. Create a new dictionary with keys from iterable "
    "and values set to value. Remove and return an item from the list at the given index."
).split()
MAX_TOKENS = [8, 16, 32, 64]


def workload(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` (prompt, max_tokens) pairs: prompts of 4-60 characters, 8-64 new tokens, a fixed mix."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(1, 16))
        prompt = " ".join(words)[: rng.randint(4, 60)]
        out.append((prompt, rng.choice(MAX_TOKENS)))
    return out


def train_model(root: Path, seconds: float, width: int, layers: int) -> Path:
    out = root / "run"
    cmd = [
        sys.executable, "-m", "lmforge", "train", "--data", "demo", "--out", str(out),
        "--config", str(REPO / "examples" / "demo.yaml"), "--data.block_size", "128", "--model.d_model", str(width),
        "--model.n_layer", str(layers), "--train.max_time", f"{seconds}s", "--train.max_steps", "100000", "--train.eval_interval", "100",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"lmforge train failed: {done.stderr[-2000:]}")
    return out


def export_model(run: Path, out: Path) -> Path:
    cmd = [sys.executable, "-m", "lmforge", "export", str(run), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"lmforge export failed: {done.stderr[-2000:]}")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def transformers_cli() -> Path | None:
    found = shutil.which("transformers")
    exe = Path(found) if found else Path(sys.executable).with_name("transformers")
    return exe if exe.exists() else None


def start_server(model_dir: Path, mode: str, args: argparse.Namespace) -> tuple[subprocess.Popen, str, str]:
    """``lmforge serve`` with ``--batching mode``, or ``transformers serve --continuous-batching`` (mode
    ``transformers-serve``, on the exported model, offline, 1 OpenMP thread) -> (process, url, model name)."""
    port = free_port()
    env = dict(os.environ)
    if mode == "transformers-serve":
        exe = transformers_cli()
        assert exe is not None
        cmd = [
            str(exe), "serve", str(model_dir), "--port", str(port), "--host", "127.0.0.1", "--device", "cpu",
            "--continuous-batching", "--log-level", "error",
        ]  # fmt: skip
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
        name = str(model_dir)
    else:
        cmd = [
            sys.executable, "-m", "lmforge", "serve", str(model_dir), "--port", str(port), "--model-name", "bench",
            "--max-concurrency", "64", "--max-batch-rows", "64", "--timeout", "600", "--log-level", "error",
            "--device", "cpu", "--threads", str(args.threads), "--batching", mode,
            "--prefill-chunk-size", str(args.prefill_chunk_size),
        ]  # fmt: skip
        name = "bench"
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url, name
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            err = server.stderr.read()[-2000:] if server.poll() is not None and server.stderr else "did not start"
            server.kill()
            raise RuntimeError(f"{mode} server: {err}")
        time.sleep(0.2)


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()


async def one_stream(client: httpx.AsyncClient, url: str, name: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {
        "model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    t0 = time.perf_counter()
    ttft = None
    text, tokens = [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code, "error": (await r.aread())[:200].decode(errors="replace")}
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("error"):
                return {"ok": False, "status": 200, "error": str(chunk["error"])[:200]}
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(choice["text"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ok": True, "ttft": ttft, "e2e": time.perf_counter() - t0, "text": "".join(text), "tokens": tokens}


async def level(url: str, name: str, clients: int, per_client: int) -> dict[str, Any]:
    jobs = workload(clients * per_client, seed=clients)
    records: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def worker(k: int) -> None:
            for prompt, n in jobs[k * per_client : (k + 1) * per_client]:
                try:
                    rec = await one_stream(client, url, name, prompt, n)
                except httpx.HTTPError as err:
                    rec = {"ok": False, "status": None, "error": f"{type(err).__name__}: {err}"[:200]}
                records.append({**rec, "prompt": prompt, "max_tokens": n})

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        wall = time.perf_counter() - t0
    return {"records": records, "wall": wall}


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))] if v else float("nan")


def summarize(mode: str, clients: int, res: dict[str, Any]) -> dict[str, Any]:
    ok = [r for r in res["records"] if r["ok"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "mode": mode,
        "clients": clients,
        "requests": len(res["records"]),
        "failed": len(res["records"]) - len(ok),
        "tokens": tokens,
        "tokens_per_s": round(tokens / res["wall"], 1),
        "ttft_p50_ms": round(1000 * pct(ttft, 50), 1),
        "ttft_p99_ms": round(1000 * pct(ttft, 99), 1),
        "e2e_p50_ms": round(1000 * pct([r["e2e"] for r in ok], 50), 1),
        "wall_s": round(res["wall"], 2),
        "first_error": next((r.get("error") for r in res["records"] if not r["ok"]), None),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="run/checkpoint dir to serve (default: train one on demo)")
    ap.add_argument("--train-seconds", type=float, default=20.0)
    ap.add_argument("--width", type=int, default=128, help="d_model of the trained transformer (4 heads)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--levels", default="1,8,32,64", help="concurrent clients, comma-separated")
    ap.add_argument("--per-client", type=int, default=3, help="streamed requests each client sends in turn")
    ap.add_argument(
        "--modes",
        default="per-request,continuous,transformers-serve",
        help="lmforge --batching modes, and transformers-serve (skipped when the command is missing)",
    )
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    ap.add_argument("--prefill-chunk-size", type=int, default=256)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    modes = args.modes.split(",")
    hf_note = "run: `transformers serve --continuous-batching` on the model exported by `lmforge export`"
    if "transformers-serve" in modes and transformers_cli() is None:
        modes.remove("transformers-serve")
        hf_note = "not run: no `transformers` command in this environment"
    load_before = os.getloadavg()

    rows: list[dict[str, Any]] = []
    texts: dict[str, dict[tuple[str, int], str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model_dir = (
            Path(args.model) if args.model else train_model(Path(tmp), args.train_seconds, args.width, args.layers)
        )
        train_s = time.perf_counter() - t0
        for mode in modes:
            served = model_dir
            if mode == "transformers-serve":
                try:
                    served = export_model(model_dir, Path(tmp) / "hf")
                except RuntimeError as err:
                    hf_note = f"not run: {err}"
                    continue
            server, url, name = start_server(served, mode, args)
            try:
                asyncio.run(level(url, name, 2, 1))  # warm-up
                for clients in levels:
                    res = asyncio.run(level(url, name, clients, args.per_client))
                    rows.append(summarize(mode, clients, res))
                    for r in res["records"]:
                        if r["ok"]:
                            texts.setdefault(mode, {})[(r["prompt"], r["max_tokens"])] = r["text"]
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                stop_server(server)
    load_after = os.getloadavg()

    mismatched = 0  # greedy texts of lmforge's two modes (transformers decodes the char tokenizer differently)
    if "per-request" in texts and "continuous" in texts:
        a, b = texts["per-request"], texts["continuous"]
        mismatched = sum(1 for k in a.keys() & b.keys() if a[k] != b[k])
    by = {(r["mode"], r["clients"]): r for r in rows}
    goals: dict[str, Any] = {}
    if ("continuous", 32) in by and ("per-request", 32) in by and ("continuous", 1) in by:
        c32, p32, c1 = by[("continuous", 32)], by[("per-request", 32)], by[("continuous", 1)]
        goals = {
            "tokens_per_s_ratio_at_32": round(c32["tokens_per_s"] / p32["tokens_per_s"], 2),
            "ttft_p99_at_32_over_1_client": round(c32["ttft_p99_ms"] / c1["ttft_p99_ms"], 2),
        }
        goals["met"] = goals["tokens_per_s_ratio_at_32"] >= 3 and goals["ttft_p99_at_32_over_1_client"] < 4
    hf = hf_note

    print(f"\nmodel: {args.model or f'demo transformer {args.layers}x{args.width} trained {train_s:.0f} s (wall, with start-up)'}; server: 1 process, "
          f"--threads {args.threads}, --prefill-chunk-size {args.prefill_chunk_size}; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")  # fmt: skip
    print("| mode | clients | requests | failed | tokens/s | TTFT p50 ms | TTFT p99 ms | e2e p50 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['clients']} | {r['requests']} | {r['failed']} | {r['tokens_per_s']:.0f} | "
              f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['e2e_p50_ms']:.0f} |")  # fmt: skip
    for c in levels:
        for other in ("per-request", "transformers-serve"):
            if ("continuous", c) in by and (other, c) in by:
                if not by[(other, c)]["tokens_per_s"]:
                    continue
                ratio = by[("continuous", c)]["tokens_per_s"] / by[(other, c)]["tokens_per_s"]
                print(f"{c} clients: continuous / {other} tokens/s = {ratio:.2f}x")
    print(f"greedy outputs differing between modes: {mismatched}")
    print(f"goals: {goals}")
    print(f"transformers serve: {hf}")
    result = {
        "benchmark": "serve_load",
        "rows": rows,
        "goals": goals,
        "mismatched": mismatched,
        "load": [load_before[0], load_after[0]],
        "transformers_serve": hf,
    }
    print("RESULT " + json.dumps(result))
    lmforge_ok = all(r["failed"] == 0 for r in rows if r["mode"] != "transformers-serve")
    return 0 if mismatched == 0 and lmforge_ok else 1


if __name__ == "__main__":
    sys.exit(main())
