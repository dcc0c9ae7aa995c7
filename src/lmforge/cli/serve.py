"""``lmforge serve MODEL_DIR``: an OpenAI-compatible HTTP server with a playground page."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lmforge.cli import UserError, command


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API (needs the 'serve' extra)",
        description="Serve MODEL over HTTP: POST /v1/completions and /v1/chat/completions (OpenAI format, "
        'streaming with "stream": true), GET /v1/models, /health, /openapi.json and a playground '
        "page at /. Concurrent requests are batched into the generation engine.",
    )
    s.add_argument("model", metavar="MODEL_DIR", help="run dir (uses best/), checkpoint dir, HF dir or hf:NAME")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model-name", default=None, help="model id clients send (default: the directory's name)")
    s.add_argument("--max-concurrency", type=int, default=8, help="requests served at once; more get 429")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds per request before 504")
    s.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens accepted")
    s.add_argument(
        "--max-batch-rows",
        type=int,
        default=32,
        help="decoding rows (prompts x sequences) of one batched generate call",
    )
    s.add_argument(
        "--batch-wait-ms",
        type=float,
        default=5.0,
        help="how long the batcher waits for concurrent requests to join a batch",
    )
    s.add_argument(
        "--batching",
        choices=["continuous", "per-request"],
        default="continuous",
        help="continuous: requests join and leave the running batch at every decoding step (default); "
        "per-request: compatible requests batched into one generate call that later ones wait for",
    )
    s.add_argument(
        "--prefill-chunk-size",
        type=int,
        default=256,
        help="prompt tokens prefilled per decoding step with continuous batching (default 256)",
    )
    s.add_argument("--max-body-bytes", type=int, default=1_000_000, help="largest request body (413 above)")
    s.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="Jinja chat template (default: the model directory's, else the plain template)",
    )
    s.add_argument(
        "--template-timeout", type=float, default=5.0, help="seconds a chat template may take to render (default 5)"
    )
    g = s.add_argument_group("connections")
    g.add_argument(
        "--header-timeout", type=float, default=10.0, help="seconds for a request's headers to arrive (default 10)"
    )
    g.add_argument(
        "--body-timeout", type=float, default=30.0, help="seconds for a request's body to arrive (default 30)"
    )
    g.add_argument("--keep-alive", type=float, default=5.0, help="seconds an idle connection stays open (default 5)")
    g.add_argument(
        "--graceful-shutdown",
        type=float,
        default=5.0,
        help="seconds requests in flight get to finish after SIGTERM / Ctrl-C (default 5)",
    )
    g.add_argument(
        "--max-connections",
        type=int,
        default=0,
        help="open connections at most; the oldest idle one makes room for a new one "
        "(default: the descriptor limit less a quarter, 768 for ulimit -n 1024)",
    )
    a = s.add_argument_group("access")
    a.add_argument(
        "--api-key",
        default=os.environ.get("LMFORGE_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' on every route but /health (default: env LMFORGE_API_KEY)",
    )
    a.add_argument(
        "--allowed-hosts",
        default=None,
        metavar="HOST,...",
        help="names the Host header may give, comma-separated; * for any (default: the --host address, "
        "localhost, 127.0.0.1 and ::1; any when --host is 0.0.0.0 or ::)",
    )
    a.add_argument(
        "--cors-origins",
        default=None,
        metavar="ORIGIN,...",
        help="origins browsers may call the API from, comma-separated, * for any (default: no CORS)",
    )
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps ...")
    s.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 is often fastest for small models)",
    )
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


@command("serve")
def run(args: argparse.Namespace, overrides: list[str]) -> int:
    if overrides:
        raise UserError(f"unexpected arguments: {' '.join(overrides)}")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise UserError(f"lmforge serve needs the 'serve' extra: pip install 'lmforge[serve]' ({err})") from None
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: must be between 0 and 65535")
    import torch

    from lmforge.serve.app import default_model_name, loading_app
    from lmforge.serve.connections import ConnectionLimits, run_server
    from lmforge.serve.security import default_allowed_hosts

    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads {args.threads}: must be at least 1")
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    options = {
        "max_concurrency": args.max_concurrency,
        "timeout": args.timeout,
        "max_tokens_limit": args.max_tokens_limit,
        "max_batch_rows": args.max_batch_rows,
        "batch_wait_ms": args.batch_wait_ms,
        "batching": args.batching,
        "prefill_chunk_size": args.prefill_chunk_size,
        "max_body_bytes": args.max_body_bytes,
        "template_timeout": args.template_timeout,
        "api_key": args.api_key,
        "allowed_hosts": _names(args.allowed_hosts, "--allowed-hosts")
        if args.allowed_hosts is not None
        else default_allowed_hosts(args.host),
        "cors_origins": _names(args.cors_origins, "--cors-origins") if args.cors_origins is not None else [],
    }
    limits = ConnectionLimits(
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        keep_alive=args.keep_alive,
        max_connections=args.max_connections,
        graceful_shutdown=args.graceful_shutdown,
    )
    if args.model_name:
        options["model_name"] = args.model_name
    if not args.model.startswith("hf:") and not Path(args.model).expanduser().exists():
        raise UserError(f"MODEL_DIR {args.model}: no such directory")
    # the port opens at once; /health answers 503 until the model has loaded
    app = loading_app(args.model, device=device, chat_template_file=args.chat_template, **options)
    name = args.model_name or default_model_name(args.model)
    print(f"serving {name} on http://{args.host}:{args.port} (playground: http://{args.host}:{args.port}/)", flush=True)
    run_server(app, host=args.host, port=args.port, limits=limits, log_level=args.log_level)
    if app.state.loading.error:
        raise UserError(f"lmforge serve {args.model}: loading the model failed: {app.state.loading.error}")
    return 0


def _names(value: str, flag: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise UserError(f"{flag} {value!r}: give at least one name, comma-separated")
    return names
