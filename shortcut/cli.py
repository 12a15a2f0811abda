"""The ``shortcut`` command: ``shortcut demo``, ``shortcut inspect`` and more.

Every subcommand is a function taking parsed arguments; ``main(argv)`` is importable
so tests run the CLI in-process. Bad input exits with code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Callable

import torch

from .data import DataFileError, prompt_input_ids, read_prompts


def _demo(args: argparse.Namespace) -> int:
    """Wrap the packaged model, generate, and show that the output is the model's own."""
    import shortcut

    model, tokenizer = shortcut.load_model(args.model)
    prompts = [r["prompt"] for r in read_prompts(args.prompts)][: args.n] if args.prompts else [
        "What is the capital of France?",
        "Give me one tip for learning a new language.",
    ]
    for text in prompts:
        ids = prompt_input_ids(tokenizer, text)
        gen = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, do_sample=False)
        start = time.perf_counter()
        plain = model.generate(**gen)
        plain_s = time.perf_counter() - start
        handle = shortcut.wrap(model)
        try:
            start = time.perf_counter()
            wrapped = model.generate(**gen)
            wrapped_s = time.perf_counter() - start
            layers = handle.stats.total.layers_per_token
        finally:
            handle.remove()
        new = plain.shape[1] - ids.shape[1]
        print(f"> {text}")
        print(tokenizer.decode(wrapped[0, ids.shape[1]:], skip_special_tokens=True).strip())
        print(f"  [{new} tokens; plain {new / plain_s:.1f} tok/s, wrapped {new / wrapped_s:.1f} tok/s; "
              f"identical={torch.equal(plain, wrapped)}; layers/token {layers:.1f} of {handle.num_layers}]\n")
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "demo": (_demo, "wrap the packaged model and generate"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shortcut", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    demo = sub.add_parser("demo", help=COMMANDS["demo"][1])
    demo.add_argument("--model", default="smollm2", help="alias, local folder, .gguf file or hub id")
    demo.add_argument("--prompts", default=None, help="JSONL of prompts (default: two built-in questions)")
    demo.add_argument("-n", type=int, default=2, help="how many prompts from --prompts")
    demo.add_argument("--new-tokens", type=int, default=40)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return COMMANDS[args.command][0](args)
    except (DataFileError, FileNotFoundError, FileExistsError, ValueError, ModuleNotFoundError) as err:
        print(f"shortcut {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
