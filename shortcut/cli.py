"""The ``shortcut`` command: ``shortcut demo``, ``shortcut inspect`` and more.

Every subcommand is a function taking parsed arguments; ``main(argv)`` is importable
so tests run the CLI in-process. Bad input exits with code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors import SafetensorError

from .data import DEFAULT_PASSAGES, check_prompt_lengths, context_length, prompt_input_ids, read_passages, read_prompts

DEFAULT_CORPUS = DEFAULT_PASSAGES

INPUT_ERRORS = (ValueError, OSError, ModuleNotFoundError, SafetensorError)
"""What bad input raises (a malformed file, a missing or taken path, a model that is
not installed, a truncated safetensors file): the commands report these in one line
and exit with code 2."""


# -- shared by the shortcut, shortcut-eval and shortcut-finetune commands -------------------
class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        """Exit with code 2 after one line naming the problem and pointing to ``--help``."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def integer(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def real(low: float, high: float = math.inf, *, include_low: bool = True) -> Callable[[str], float]:
    """An argparse ``type``: a finite number in ``[low, high)`` (``(low, high)`` unless ``include_low``)."""
    interval = f"{'[' if include_low else '('}{low:g}, {high:g})"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (low <= value if include_low else low < value) and value < high):
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text!r}")
        return value

    parse.__name__ = f"number in {interval}"
    return parse


def check_output_folder(path: str | Path, option: str) -> Path:
    """Refuse an output path that cannot become a folder (an existing file, a path under
    a file, an unwritable place) before any work starts; returns it as a Path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{option} {path} exists and is not a folder")
    above = path.absolute().parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise NotADirectoryError(f"{option} {path}: {above} is a file, not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {path}: no permission to write in {above}")
    return path


def report_error(prog: str, err: BaseException) -> int:
    """Print ``err`` as one line on stderr; returns the exit code for bad input, 2."""
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def _demo(args: argparse.Namespace) -> int:
    """Wrap the packaged model, generate, and show that the output is the model's own."""
    import shortcut

    records: list[dict[str, Any]] = read_prompts(args.prompts)[: args.n] if args.prompts else [
        {"prompt": "What is the capital of France?"},
        {"prompt": "Give me one tip for learning a new language."},
    ]
    model, tokenizer = shortcut.load_model(args.model)
    check_prompt_lengths(tokenizer, records, max_new_tokens=args.new_tokens, context=context_length(model, tokenizer),
                         source=args.prompts or "")
    for record in records:
        text = record.get("prompt") or record["messages"][-1]["content"]
        ids = prompt_input_ids(tokenizer, record)
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


def _practice(args: argparse.Namespace) -> int:
    """Practise a prompts file for some rounds and save the skills."""
    import shortcut

    from .skills.folder import read_manifest

    # every file and path is checked before the slow model load
    records = read_prompts(args.prompts)
    out = check_output_folder(args.output, "-o/--output")
    if out.exists() and any(out.iterdir()) and not (out / "shortcut.json").exists():
        raise FileExistsError(f"{out} is not empty and is not a shortcut skills folder")
    if args.skills:
        read_manifest(Path(args.skills))
    else:
        texts = [r["text"] for r in read_passages(args.corpus)]
    model, tokenizer = shortcut.load_model(args.model)
    check_prompt_lengths(tokenizer, records, max_new_tokens=args.new_tokens, context=context_length(model, tokenizer),
                         source=args.prompts)
    if args.skills:
        handle = shortcut.load(model, args.skills)
    else:
        learning = shortcut.LearningConfig(consolidate_every=0)
        handle = shortcut.wrap(model, shortcut.ShortcutConfig(seed=args.seed, learning=learning))
        handle.train_observer(texts, tokenizer, steps=args.sae_steps, progress=not args.quiet)
    rows = handle.practice(records, rounds=args.rounds, max_new_tokens=args.new_tokens, tokenizer=tokenizer,
                           progress=not args.quiet)
    print(f"{'round':>5}{'tokens':>8}{'tok/s':>8}{'layer calls/tok':>16}{'drafted':>9}{'accept':>8}{'recalled':>9}"
          f"{'learn s':>9}")
    for r in rows:
        print(f"{r['round']:>5}{r['generated_tokens']:>8}{r['tokens_per_second']:>8.1f}"
              f"{r['layer_calls_per_token']:>16.1f}{r['drafted']:>9}{100 * r['acceptance']:>7.0f}%{r['recalled']:>9}"
              f"{r['learn_seconds'] + r['consolidate_seconds']:>9.1f}")
    handle.save_pretrained(out)
    print(f"skills saved to {out}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    """Show what a skills folder learned."""
    from .skills.summary import describe

    print(describe(Path(args.skills), top=args.top))
    if args.timing:
        from .skills.summary import observer_decode_share

        t = observer_decode_share(Path(args.skills), args.model)
        print(f"  observer share of decode time on {args.model}: {100 * t['share']:.1f}% "
              f"(SAE encode {t['observer_encode_ms']:.2f} ms per token, decode step {t['decode_step_ms']:.1f} ms; "
              f"medians, timed back to back)")
    return 0


def _merge(args: argparse.Namespace) -> int:
    """Merge the practice of several skills folders made on the same base model."""
    from .skills.merge import merge_skills

    output = check_output_folder(args.output, "-o/--output")
    if (output / "shortcut.json").is_file() and not args.overwrite:
        raise FileExistsError(f"-o/--output {output} already holds skills; pass --overwrite to replace them")
    folder = merge_skills([Path(p) for p in args.skills], output, overwrite=args.overwrite)
    print(f"merged {len(args.skills)} skills folders into {folder}")
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "demo": (_demo, "wrap the packaged model and generate"),
    "practice": (_practice, "practise a prompts JSONL for some rounds and save the skills"),
    "inspect": (_inspect, "show what a skills folder learned"),
    "merge": (_merge, "merge skills folders of the same base model"),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``shortcut`` argument parser, one subcommand per entry of ``COMMANDS``."""
    parser = Parser(prog="shortcut", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    demo = sub.add_parser("demo", help=COMMANDS["demo"][1])
    demo.add_argument("--model", default="smollm2", help="alias, local folder, .gguf file or hub id")
    demo.add_argument("--prompts", default=None, help="JSONL of prompts (default: two built-in questions)")
    demo.add_argument("-n", type=integer(1), default=2, help="how many prompts from --prompts")
    demo.add_argument("--new-tokens", type=integer(1), default=40)

    practice = sub.add_parser("practice", help=COMMANDS["practice"][1])
    practice.add_argument("prompts", help="JSONL with a 'prompt' or 'messages' per line")
    practice.add_argument("-o", "--output", required=True, help="skills folder to write")
    practice.add_argument("--model", default="smollm2", help="alias, local folder, .gguf file or hub id")
    practice.add_argument("--skills", default=None, help="skills folder to start from")
    practice.add_argument("--rounds", type=integer(1), default=3)
    practice.add_argument("--new-tokens", type=integer(1), default=64)
    practice.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="JSONL of {'text'} to train the observer on")
    practice.add_argument("--sae-steps", type=integer(1), default=1500)
    practice.add_argument("--seed", type=int, default=0)
    practice.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    inspect = sub.add_parser("inspect", help=COMMANDS["inspect"][1])
    inspect.add_argument("skills", help="skills folder")
    inspect.add_argument("--top", type=integer(0), default=10, help="how many SAE features to list")
    inspect.add_argument("--timing", action="store_true",
                         help="also time the observer's share of decode time (loads --model)")
    inspect.add_argument("--model", default="smollm2", help="base model for --timing")

    merge = sub.add_parser("merge", help=COMMANDS["merge"][1])
    merge.add_argument("skills", nargs="+", help="skills folders (same base model, same observer)")
    merge.add_argument("-o", "--output", required=True)
    merge.add_argument("--overwrite", action="store_true", help="replace an existing skills folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``shortcut`` command; returns the exit status (expected errors are printed, not raised)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return COMMANDS[args.command][0](args)
    except (*INPUT_ERRORS, RuntimeError) as err:
        return report_error(f"shortcut {args.command}", err)


if __name__ == "__main__":
    sys.exit(main())
