"""`tunelab serve` (the OpenAI-compatible API) and `tunelab chat` (a terminal chat)."""

from __future__ import annotations

import argparse
import ipaddress
import os

from tunelab.errors import TunelabError


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "serve",
        help="an OpenAI-compatible API (/v1/completions, /v1/chat/completions) for runs and models",
        epilog="clients pick a model by name: the run directory's basename, or NAME from --name NAME=PATH",
    )
    s.add_argument("models", nargs="*", metavar="RUN|MODEL", help="run directories, HF folders or hub ids")
    s.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="RUN",
        help="a LoRA run sharing the first model's weights",
    )
    s.add_argument(
        "--name", action="append", default=[], metavar="NAME=PATH", help="serve PATH under NAME (repeatable)"
    )
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    s.add_argument("--port", type=_port, default=8000)
    s.add_argument(
        "--api-key",
        default=os.environ.get("TUNELAB_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $TUNELAB_API_KEY)",
    )
    s.add_argument(
        "--cors-origin", action="append", default=[], metavar="ORIGIN", help="allow browser calls from ORIGIN"
    )
    s.add_argument("--max-batch-size", type=int, default=32, help="rows generated together at most")
    s.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long a request waits for others to batch with"
    )
    s.add_argument(
        "--max-tokens-limit", type=int, default=2048, help="the most max_tokens a request may ask for"
    )
    s.add_argument("--default-max-tokens", type=int, default=256)
    s.add_argument("--max-body-bytes", type=int, default=1 << 20)
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="auto")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("chat", help="chat with a run in the terminal (/reset, /exit)")
    c.add_argument("model", metavar="RUN|MODEL", help="run directory, HF folder or hub id")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--system", help="a system message (chat-template runs only)")
    c.add_argument("--device", default="auto")
    c.set_defaults(func=cmd_chat)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return port


def _check_port_free(host: str, port: int) -> None:
    """Bind and let go, before any model loads: a port in use is said with what to do."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as e:
            raise TunelabError(
                f"cannot listen on {host}:{port}: {e.strerror}",
                "pick another port with --port, or stop what is using this one",
            ) from None


def _parse_names(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise TunelabError(f"--name {pair}: expected NAME=PATH", "e.g. --name qa=runs/qa-20250101")
        out[path] = name
    return out


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from tunelab.serve.app import ServeSettings, create_app
    except ImportError as e:
        raise TunelabError(
            f"tunelab serve needs fastapi and uvicorn ({e})", "pip install 'tunelab[serve]'"
        ) from None
    from tunelab.serve.engine import Engine
    from tunelab.serve.models import load_served, uses_history

    names = _parse_names(args.name)
    paths = list(args.models) + [p for p in names if p not in args.models and p not in args.adapter]
    if not paths:
        raise TunelabError(
            "nothing to serve", "tunelab serve RUN [RUN ...] [--adapter RUN] [--name NAME=PATH]"
        )
    _check_port_free(args.host, args.port)
    if args.max_batch_size < 1 or args.max_tokens_limit < 1 or args.default_max_tokens < 1:
        raise TunelabError(
            "--max-batch-size, --max-tokens-limit and --default-max-tokens must be at least 1",
            "give each a whole number of 1 or more, or leave it out for its default",
        )
    if not _is_loopback(args.host) and not args.api_key:
        print(
            f"warning: binding {args.host} without --api-key: anyone who can reach this port can use the models"
        )
    served = load_served(paths, args.adapter, names, device=args.device, dtype=args.dtype)
    for s in served.values():
        template = s.generator.template.name if s.generator.template else "none (text as-is)"
        history = "whole conversation" if uses_history(s.generator) else "last user message only"
        print(f"serving '{s.name}': template {template}; chat sees the {history}; context {s.context_length}")
    engine = Engine(served, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms)
    settings = ServeSettings(
        api_key=args.api_key or None,
        cors_origins=args.cors_origin,
        max_body_bytes=args.max_body_bytes,
        max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=min(args.default_max_tokens, args.max_tokens_limit),
    )
    print(f"OpenAI-compatible API at http://{args.host}:{args.port}/v1  (Ctrl-C finishes in-flight requests)")
    config = uvicorn.Config(
        create_app(engine, settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=30,
    )
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once its graceful shutdown is done
        pass
    per_batch = engine.batched_rows / max(engine.batches, 1)
    print(
        f"server stopped: {engine.batched_rows} rows in {engine.batches} batches ({per_batch:.1f} per batch)"
    )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tunelab.chat import chat_loop
    from tunelab.generate import Generator, check_decoding, note_unused_sampling

    check_decoding(args.max_new_tokens, args.temperature, args.top_p)  # before the model loads
    note_unused_sampling(args.temperature, args.top_p)
    gen = Generator.load(args.model, device=args.device)
    return chat_loop(
        gen,
        name=args.model,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        system=args.system,
    )
