"""How often lossless output differs from plain decoding in reduced precision.

    OMP_NUM_THREADS=1 python benchmarks/precision_lossless.py

Tiny random models of four architectures (``tests/conftest.py``) in bfloat16 and
float16 practise 20 random prompts for 2 rounds with skills that draft; then 40 greedy
calls (the 20 practised prompts and 20 new ones, 16 new tokens) are compared with the
unwrapped model's. A verified position's logits come from a forward over several tokens
instead of one, which in reduced precision may change them enough to flip an argmax.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import shortcut  # noqa: E402
from tests.conftest import make_tiny  # noqa: E402
from tests.test_practice import _observer  # noqa: E402


def main() -> int:
    total = 0
    for dtype in (torch.bfloat16, torch.float16):
        for arch in ("llama", "gpt2", "qwen3", "gemma3_text"):
            model = make_tiny(arch).to(dtype)
            config = shortcut.ShortcutConfig(observer_layers=[0], exit_layers=[1, 2],
                                             lossless=shortcut.LosslessConfig(draft_confidence=0.0),
                                             learning=shortcut.LearningConfig(policy_threshold=0.3, fit_steps=20))
            handle = shortcut.wrap(model, config)
            handle.attach_observer(_observer(model))
            g = torch.Generator().manual_seed(1)
            prompts = [torch.randint(3, 96, (1, int(torch.randint(4, 12, (1,), generator=g))), generator=g)
                       for _ in range(40)]
            handle.practice(prompts[:20], rounds=2, max_new_tokens=16, progress=False)
            before, mismatches = handle.decode_stats.copy(), 0
            for prompt in prompts:
                with handle.disabled():
                    ref = model.generate(input_ids=prompt, max_new_tokens=16, do_sample=False)
                mismatches += not torch.equal(model.generate(input_ids=prompt, max_new_tokens=16, do_sample=False), ref)
            delta = handle.decode_stats - before
            total += mismatches
            print(f"{str(dtype):15} {arch:12} calls {len(prompts)}  mismatches {mismatches}  "
                  f"drafted {delta.drafted}  accepted {delta.accepted}", flush=True)
            handle.remove()
    return 1 if total else 0


if __name__ == "__main__":
    raise SystemExit(main())
