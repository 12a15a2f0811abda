"""Llama (SmolLM2 is a llama)."""

from shortcut.arch import ArchSpec, llama_like_kv, register_architecture

register_architecture(
    ArchSpec(model_types=("llama",), layers="model.layers", final_norm="model.norm",
             project_kv=llama_like_kv)
)
