"""Mistral."""

from shortcut.arch import ArchSpec, llama_like_kv, register_architecture

register_architecture(
    ArchSpec(model_types=("mistral",), layers="model.layers", final_norm="model.norm",
             project_kv=llama_like_kv)
)
