"""Web demo: a Gradio chat page plus an OpenAI-compatible API and the original's JSON API, one server.

    python web.py --lora_dir saved_models/demo                 # http://127.0.0.1:7860
    curl -s localhost:7860/v1/chat/completions -H 'content-type: application/json' \\
        -d '{"model": "demo", "messages": [{"role": "user", "content": "What is 2 + 3?"}]}'
    curl -s localhost:7860/ -H 'content-type: application/json' -d '{"prompt": "What is 2 + 3?"}'
    ALPACA_COT_API_KEY=secret python web.py --lora_dir saved_models/demo --host 0.0.0.0   # on the network

Binds to 127.0.0.1 unless --host says otherwise; a public link only with --share. Any other
address, or --share, needs an API key: clients send 'Authorization: Bearer <key>'.
"""

from __future__ import annotations

import argparse
import os
import sys

from alpaca_cot.cli import ArgumentParser, add_generation_arguments, add_model_arguments, run_cli


def build_parser() -> argparse.ArgumentParser:
    """Flags: model, address, key, limits, generation defaults."""
    p = ArgumentParser(prog="web.py", description=__doc__, allow_abbrev=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it: needs --api_key)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (needs --api_key)")
    p.add_argument("--api_key", default=os.environ.get("ALPACA_COT_API_KEY") or None,
                   help="key every API request must send as 'Authorization: Bearer KEY'; also the page's password "
                        "(default: $ALPACA_COT_API_KEY, which keeps it out of the process list)")
    p.add_argument("--max_new_tokens_cap", type=int, default=512, help="no request generates more than this")
    p.add_argument("--max_prompt_tokens", type=int,
                   help="longest accepted prompt (default: the context minus the request's own max_tokens)")
    p.add_argument("--max_request_bytes", type=int, default=1 << 20,
                   help="larger request bodies get 413 before being parsed (default: 1 MiB)")
    p.add_argument("--max_queue", type=int, default=32,
                   help="API requests allowed to wait for the model; more get 429 with Retry-After")
    add_generation_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Check the address and limits, load the model, serve the page and the APIs until interrupted."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo

    def run() -> int:
        from alpaca_cot.serve.webapp import ServerOptions, check_server_options, serve

        options = ServerOptions(args.host, args.port, args.share, args.api_key, args.max_request_bytes,
                                args.max_queue)
        check_server_options(options)  # before the model loads
        from alpaca_cot.infer.loading import load_from_args
        from alpaca_cot.presets import generation_overrides
        from alpaca_cot.serve.engine import Engine

        loaded = load_from_args(args)
        defaults = generation_overrides(args)  # the engine streams with one beam whatever --num_beams says
        engine = Engine(loaded, args.preset, defaults, args.max_new_tokens_cap, args.max_prompt_tokens,
                        args.max_queue)
        serve(engine, os.path.basename(os.path.normpath(args.lora_dir or loaded.base_model)), options)
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
