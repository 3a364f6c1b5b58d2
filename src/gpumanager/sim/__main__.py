"""Run one simulated Ollama in the foreground: ``python -m gpumanager.sim --port 11434``.

Used by the demo and the benchmark, and handy for pointing a real client at a fake
GPU host. Ctrl-C stops it like ``uvicorn.run``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import uvicorn

from gpumanager.sim.ollama import SimOllama
from gpumanager.sockets import bind_socket


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gpumanager.sim",
        description="Serve a simulated Ollama (native /api and OpenAI /v1 routes) with deterministic "
        "answers: n tokens are 'tok0 tok1 ... tok{n-1} '.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=11434, help="port to bind (0 picks a free one)")
    parser.add_argument(
        "--models", default="llama3.2:latest", help="comma-separated model names; a name without a tag gets ':latest'"
    )
    parser.add_argument("--slots", type=int, default=4, help="generations served at once; more requests queue")
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds per generated token")
    parser.add_argument(
        "--tokens", type=int, default=20, help="tokens per answer when the request sets no num_predict/max_tokens"
    )
    parser.add_argument(
        "--load-delay", type=float, default=0.0, help="extra seconds on a model's first use, like loading it into VRAM"
    )
    parser.add_argument("--name", default="sim", help="name shown in logs and crash messages")
    parser.add_argument("--version", dest="ollama_version", default="0.12.6", help="version reported by /api/version")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    app = SimOllama(
        name=args.name,
        models=models,
        slots=args.slots,
        token_delay=args.token_delay,
        default_tokens=args.tokens,
        load_delay=args.load_delay,
        version=args.ollama_version,
    )
    # Bind first so that --port 0 can print the port actually chosen.
    sock = bind_socket(args.host, args.port)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        host=args.host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
    )
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"simulated Ollama {args.name!r} serving {', '.join(app.models)} at http://{host}:{port}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
