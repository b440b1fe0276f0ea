"""Web demo: a Gradio chat page plus an OpenAI-compatible API and the original's JSON API, one server.

    python web.py --lora_dir saved_models/demo                 # http://127.0.0.1:7860
    curl -s localhost:7860/v1/chat/completions -H 'content-type: application/json' \\
        -d '{"model": "demo", "messages": [{"role": "user", "content": "What is 2 + 3?"}]}'
    curl -s localhost:7860/ -H 'content-type: application/json' -d '{"prompt": "What is 2 + 3?"}'

Binds to 127.0.0.1 unless --host says otherwise; a public link only with --share.
"""

from __future__ import annotations

import argparse
import os
import sys

from alpaca_cot.cli import add_generation_arguments, add_model_arguments, run_cli


def build_parser() -> argparse.ArgumentParser:
    """Flags: model, address, caps, generation defaults."""
    p = argparse.ArgumentParser(prog="web.py", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    p.add_argument("--max_new_tokens_cap", type=int, default=512, help="no request generates more than this")
    p.add_argument("--max_prompt_tokens", type=int, help="longest accepted prompt (default: context - cap)")
    add_generation_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Load the model, start the page and the APIs, serve until interrupted."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo

    def run() -> int:
        from alpaca_cot.errors import UserError
        from alpaca_cot.inference import load_from_args
        from alpaca_cot.serving import Engine
        from alpaca_cot.webapp import add_api_routes, build_chat_page, check_port_free

        check_port_free(args.host, args.port)  # before the model loads
        loaded = load_from_args(args)
        defaults = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                    "top_k": args.top_k, "repetition_penalty": args.repetition_penalty,
                    "no_repeat_ngram_size": args.no_repeat_ngram_size}
        engine = Engine(loaded, args.preset, defaults, args.max_new_tokens_cap, args.max_prompt_tokens)
        name = os.path.basename(os.path.normpath(args.lora_dir or loaded.base_model))
        page = build_chat_page(engine, f"Alpaca-CoT chat: {name}")
        page.queue(default_concurrency_limit=1)  # one generation at a time; the rest wait in line
        try:
            app, local_url, share_url = page.launch(server_name=args.host, server_port=args.port, share=args.share,
                                                    prevent_thread_lock=True, quiet=True)
        except OSError as exc:  # taken between the check and the launch; Gradio's message names its env variable
            raise UserError(f"--port {args.port}: cannot serve on {args.host}:{args.port} ({exc}); pick another "
                            "--port") from exc
        add_api_routes(app, engine, name)
        print(f"serving {name} on {local_url}" + (f" and {share_url}" if share_url else ""), flush=True)
        print(f"OpenAI-compatible API: {local_url.rstrip('/')}/v1/chat/completions", flush=True)
        page.block_thread()
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
