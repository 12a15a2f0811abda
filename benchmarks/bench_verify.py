"""What does verifying a draft cost, by its width?

Lossless mode verifies a draft of k tokens with one full forward over k + 1 tokens. On a
CPU that forward is not "almost free" for every width: the matrix kernels change with
the number of rows. This times the packaged model's forward over w new tokens after a
real prompt (the cache holds the prompt; cropped back after every forward), for each
width, and prints the median relative to one token: the price of a draft that is longer
by one token, and why short drafts of familiar-looking text can cost more than they save.

    python benchmarks/bench_verify.py                     # widths 1..33, 15 repeats each
    python benchmarks/bench_verify.py --threads 1 --repeats 9
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import shortcut  # noqa: E402
from shortcut.data import prompt_input_ids, read_prompts  # noqa: E402
from shortcut.decode.lossless import crop_all  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "shortcut_eval" / "data" / "prompts.jsonl"
WIDTHS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 17, 24, 32, 33)


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict[int, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = shortcut.load_model(args.model)
    prompt = prompt_input_ids(tokenizer, read_prompts(DATA)[0])
    cache = DynamicCache(config=model.config)
    model(input_ids=prompt, past_key_values=cache, use_cache=True)
    length = prompt.shape[1]
    # Draft-like inputs: the prompt's own tokens, repeated as needed.
    tokens = prompt[0].repeat(max(WIDTHS) // length + 1)

    def forward_ms(width: int) -> float:
        ids = tokens[:width].unsqueeze(0)
        positions = torch.arange(length, length + width).unsqueeze(0)
        times = []
        for _ in range(args.repeats + 2):  # the first two warm up
            start = time.perf_counter()
            model(input_ids=ids, past_key_values=cache, use_cache=True, position_ids=positions)
            times.append(time.perf_counter() - start)
            crop_all(cache, length)
        return 1000 * statistics.median(times[2:])

    ms = {width: forward_ms(width) for width in WIDTHS}
    print(f"model={args.model} threads={torch.get_num_threads()} prompt={length} tokens, "
          f"median of {args.repeats} forwards per width")
    print(f"{'width':>5} {'ms':>8} {'x one token':>12} {'ms per token':>13}")
    for width, value in ms.items():
        print(f"{width:>5} {value:>8.1f} {value / ms[1]:>12.2f} {value / width:>13.1f}")
    return {width: value / ms[1] for width, value in ms.items()}


if __name__ == "__main__":
    main()
