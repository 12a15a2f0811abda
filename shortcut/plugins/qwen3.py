"""Qwen3 (keys pass through k_norm, handled by llama_like_kv)."""

from shortcut.arch import ArchSpec, llama_like_kv, register_architecture

register_architecture(
    ArchSpec(model_types=("qwen3",), layers="model.layers", final_norm="model.norm",
             project_kv=llama_like_kv)
)
