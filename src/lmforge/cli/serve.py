"""``lmforge serve MODEL_DIR``: an OpenAI-compatible HTTP server with a playground page."""

from __future__ import annotations

import argparse

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
    s.add_argument("--max-body-bytes", type=int, default=1_000_000, help="largest request body (413 above)")
    s.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="Jinja chat template (default: the model directory's, else the plain template)",
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
        import uvicorn
    except ImportError as err:
        raise UserError(f"lmforge serve needs the 'serve' extra: pip install 'lmforge[serve]' ({err})") from None
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: must be between 0 and 65535")
    import torch

    from lmforge.serve.app import load_app

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
        "max_body_bytes": args.max_body_bytes,
    }
    if args.model_name:
        options["model_name"] = args.model_name
    app = load_app(args.model, device=device, chat_template_file=args.chat_template, **options)
    if device == "cpu":  # build (or load) the C++ decoding step now rather than during the first request
        from lmforge.models import native

        native.decode_step()
    print(
        f"serving {app.state.server.options.model_name} on http://{args.host}:{args.port} "
        f"(playground: http://{args.host}:{args.port}/)",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
