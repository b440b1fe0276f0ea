"""Console chat with a base model + adapter: multi-turn, answers streamed as they are generated.

    python server.py --lora_dir saved_models/demo
    printf 'My name is Ada.\nWhat is my name?\nstop\n' | python server.py --lora_dir saved_models/demo

Type `clear` to start a new conversation and `stop` to quit. Works in a terminal and through a pipe.
"""

from __future__ import annotations

import argparse
import sys

from alpaca_cot.cli import ArgumentParser, add_generation_arguments, add_model_arguments, run_cli


def build_parser() -> argparse.ArgumentParser:
    """Flags: model (adapter and overrides), context limit, generation settings."""
    p = ArgumentParser(prog="server.py", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--max_context", type=int, help="cap on prompt + answer tokens (default: the model's window)")
    p.add_argument("--size", help=argparse.SUPPRESS)  # the original's flags; the run folder says all this now
    p.add_argument("--lora_r", help=argparse.SUPPRESS)
    p.add_argument("--lora_alpha", help=argparse.SUPPRESS)
    p.add_argument("--lora_dropout", help=argparse.SUPPRESS)
    add_generation_arguments(p)
    return p


def _read_lines(interactive: bool):
    while True:
        try:
            line = input("User: ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and line == "":
            return
        yield line.strip()


def main(argv: list[str] | None = None) -> int:
    """Chat until `stop` or the end of input."""
    args = build_parser().parse_args(argv)

    def run() -> int:
        from alpaca_cot.checks import check_streaming_flags
        from alpaca_cot.infer.generation import generation_config_from_args
        from alpaca_cot.infer.loading import load_from_args
        from alpaca_cot.serve.chat import ChatSession

        check_streaming_flags(args)  # before the model loads
        loaded = load_from_args(args)
        config = generation_config_from_args(loaded, args)
        session = ChatSession(loaded, config, args.max_context)
        interactive = sys.stdin.isatty()
        if interactive:
            print("Type `clear` to start over, `stop` to quit.")
        for line in _read_lines(interactive):
            if line == "stop":
                break
            if line == "clear":
                session.clear()
                print("(history cleared)", flush=True)
                continue
            if not line:
                continue
            if interactive:
                print("Assistant: ", end="", flush=True)
            for piece in session.stream_reply(line):
                print(piece, end="", flush=True)
            print(flush=True)
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
