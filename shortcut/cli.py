"""The ``shortcut`` command: ``shortcut demo``, ``shortcut inspect`` and more.

Every subcommand is a function taking parsed arguments; ``main(argv)`` is importable
so tests run the CLI in-process. Bad input exits with code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .data import DEFAULT_PASSAGES, DataFileError, prompt_input_ids, read_jsonl, read_prompts

DEFAULT_CORPUS = DEFAULT_PASSAGES


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


def _practice(args: argparse.Namespace) -> int:
    """Practise a prompts file for some rounds and save the skills."""
    import shortcut

    records = read_prompts(args.prompts)  # validate before the slow model load
    if args.rounds < 1:
        raise ValueError(f"--rounds {args.rounds} must be at least 1")
    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not (out / "shortcut.json").exists():
        raise FileExistsError(f"{out} is not empty and is not a shortcut skills folder")
    model, tokenizer = shortcut.load_model(args.model)
    if args.skills:
        handle = shortcut.load(model, args.skills)
    else:
        handle = shortcut.wrap(model, shortcut.ShortcutConfig(consolidate_every=0, seed=args.seed))
        texts = [r["text"] for r in read_jsonl(args.corpus)]
        handle.train_observer(texts, tokenizer, steps=args.sae_steps, progress=not args.quiet)
    rows = handle.practice(records, rounds=args.rounds, max_new_tokens=args.new_tokens, tokenizer=tokenizer,
                           progress=not args.quiet)
    print(f"{'round':>5}{'tokens':>8}{'tok/s':>8}{'layer calls/tok':>16}{'drafted':>9}{'accept':>8}{'replayed':>9}"
          f"{'learn s':>9}")
    for r in rows:
        print(f"{r['round']:>5}{r['generated_tokens']:>8}{r['tokens_per_second']:>8.1f}"
              f"{r['layer_calls_per_token']:>16.1f}{r['drafted']:>9}{100 * r['acceptance']:>7.0f}%{r['replayed']:>9}"
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

    folder = merge_skills([Path(p) for p in args.skills], Path(args.output), overwrite=args.overwrite)
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
    parser = argparse.ArgumentParser(prog="shortcut", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    demo = sub.add_parser("demo", help=COMMANDS["demo"][1])
    demo.add_argument("--model", default="smollm2", help="alias, local folder, .gguf file or hub id")
    demo.add_argument("--prompts", default=None, help="JSONL of prompts (default: two built-in questions)")
    demo.add_argument("-n", type=int, default=2, help="how many prompts from --prompts")
    demo.add_argument("--new-tokens", type=int, default=40)

    practice = sub.add_parser("practice", help=COMMANDS["practice"][1])
    practice.add_argument("prompts", help="JSONL with a 'prompt' or 'messages' per line")
    practice.add_argument("-o", "--output", required=True, help="skills folder to write")
    practice.add_argument("--model", default="smollm2", help="alias, local folder, .gguf file or hub id")
    practice.add_argument("--skills", default=None, help="skills folder to start from")
    practice.add_argument("--rounds", type=int, default=3)
    practice.add_argument("--new-tokens", type=int, default=64)
    practice.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="JSONL of {'text'} to train the observer on")
    practice.add_argument("--sae-steps", type=int, default=1500)
    practice.add_argument("--seed", type=int, default=0)
    practice.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    inspect = sub.add_parser("inspect", help=COMMANDS["inspect"][1])
    inspect.add_argument("skills", help="skills folder")
    inspect.add_argument("--top", type=int, default=10, help="how many SAE features to list")
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
    except (DataFileError, FileNotFoundError, FileExistsError, ValueError, ModuleNotFoundError, RuntimeError) as err:
        print(f"shortcut {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
