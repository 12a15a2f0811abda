"""The same guarantees on a CUDA device (skipped where there is none): everything
follows the model's device."""

from __future__ import annotations

import pytest
import torch

import shortcut

from .conftest import make_tiny
from .test_practice import PROMPTS, _observer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_practise_lossless_save_load_on_cuda(dtype, tmp_path):
    model = make_tiny("llama").to("cuda", dtype)
    config = shortcut.ShortcutConfig(observer_layers=[0], exit_layers=[1, 2],
                                     lossless=shortcut.LosslessConfig(draft_confidence=0.0),
                                     learning=shortcut.LearningConfig(policy_threshold=0.3, fit_steps=10))
    handle = shortcut.wrap(model, config)
    handle.attach_observer(_observer(make_tiny("llama")))  # trained on the CPU copy
    handle.observer.sae.to("cuda")
    prompts = [p.to("cuda") for p in PROMPTS]
    handle.practice(prompts, rounds=2, max_new_tokens=8, progress=False)
    for prompt in prompts:
        with handle.disabled():
            ref = model.generate(input_ids=prompt, max_new_tokens=12, do_sample=False)
        assert torch.equal(model.generate(input_ids=prompt, max_new_tokens=12, do_sample=False), ref)
    folder = handle.save_pretrained(tmp_path / "skills")
    handle.remove()
    loaded = shortcut.load(make_tiny("llama").to("cuda", dtype), folder)
    out = loaded.model.generate(input_ids=prompts[0], max_new_tokens=12, do_sample=False)
    assert out.device.type == "cuda"
