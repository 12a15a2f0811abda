"""Fuzz lossless decoding: many random ``generate`` calls on wrapped tiny models, each
compared with the same model's plain ``generate``.

The cases are those of ``tests/test_fuzz.py`` (random options, prompts that repeat,
prefix or extend practised ones, lossless and fast mode), drawn from ``--seed`` and
spread evenly over the architectures. Prints one row per architecture (calls, calls
compared, mismatches), one per option (calls that used it, mismatches among them), and a
result line; exits with status 1 on any mismatch.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/fuzz_lossless.py --calls 1000
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tests.test_fuzz import FUZZ_ARCHS, char_tokenizer, describe, fuzz_handle, random_case, run_case  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="fuzzed generate calls in all (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the case generator (default 0)")
    parser.add_argument("--archs", nargs="+", default=list(FUZZ_ARCHS), help="architectures (tiny random models)")
    parser.add_argument("--show", type=int, default=5, help="mismatching cases to print in full (default 5)")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error(f"--calls must be at least 1, got {args.calls}")
    torch.set_num_threads(1)
    logging.getLogger("shortcut").setLevel(logging.ERROR)  # full-path warnings are expected here
    logging.getLogger("transformers").setLevel(logging.ERROR)

    started = time.perf_counter()
    tokenizer = char_tokenizer()
    rng = random.Random(args.seed)
    calls, compared, mismatched = Counter(), Counter(), Counter()
    drafted, accepted = Counter(), Counter()  # draft tokens proposed / accepted in the fuzzed calls
    option_calls, option_mismatches = Counter(), Counter()
    shown = 0
    for a, arch in enumerate(args.archs):
        model, handle = fuzz_handle(arch)
        history: list[list[int]] = []
        start = handle.decode_stats.copy()
        share = args.calls // len(args.archs) + (a < args.calls % len(args.archs))
        try:
            for _ in range(share):
                case = random_case(rng, handle, history)
                did_compare, mismatch = run_case(model, handle, case, tokenizer)
                calls[arch] += 1
                compared[arch] += did_compare
                for tag in case.tags:
                    option_calls[tag] += 1
                if mismatch is not None:
                    mismatched[arch] += 1
                    for tag in case.tags:
                        option_mismatches[tag] += 1
                    if shown < args.show:
                        shown += 1
                        print(f"MISMATCH {arch}: {describe(case)}: {mismatch}", flush=True)
        finally:
            drafted[arch] = int((handle.decode_stats - start).drafted)
            accepted[arch] = int((handle.decode_stats - start).accepted)
            handle.remove()
    wall = time.perf_counter() - started

    print(f"\n{'architecture':<14}{'calls':>8}{'compared':>10}{'mismatches':>12}{'drafted':>10}{'accepted':>10}")
    for arch in args.archs:
        print(f"{arch:<14}{calls[arch]:>8}{compared[arch]:>10}{mismatched[arch]:>12}{drafted[arch]:>10}"
              f"{accepted[arch]:>10}")
    print(f"\n{'option':<22}{'calls':>8}{'mismatches':>12}")
    for tag in sorted(option_calls):
        print(f"{tag:<22}{option_calls[tag]:>8}{option_mismatches[tag]:>12}")
    total, total_compared, total_bad = sum(calls.values()), sum(compared.values()), sum(mismatched.values())
    print(f"\nresult: {total} calls ({total_compared} compared, {total - total_compared} fast-mode calls that "
          f"committed shallow tokens), {total_bad} mismatches, {wall:.1f}s wall, seed {args.seed}")
    return 1 if total_bad else 0


if __name__ == "__main__":
    sys.exit(main())
