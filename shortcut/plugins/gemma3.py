"""Gemma 3 text models (q/k norms; sliding-window layers keep their window in the cache
itself, so skipped layers write through the same ``cache.update``)."""

from shortcut.arch import ArchSpec, llama_like_kv, register_architecture

register_architecture(
    ArchSpec(model_types=("gemma3_text",), layers="model.layers", final_norm="model.norm",
             project_kv=llama_like_kv)
)
