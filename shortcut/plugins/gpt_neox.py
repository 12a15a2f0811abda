"""GPT-NeoX (Pythia): fused ``query_key_value`` interleaved per head, partial rotary,
cache argument called ``layer_past``."""

from shortcut.arch import ArchSpec, register_architecture, rotate_keys


def gpt_neox_kv(layer, hidden, position_embeddings):
    """Keys/values of a gpt_neox layer for ``hidden``, keys rotated."""
    attn = layer.attention
    x = layer.input_layernorm(hidden)
    qkv = attn.query_key_value(x).view(*x.shape[:-1], -1, 3 * attn.head_size).transpose(1, 2)
    _, keys, values = qkv.chunk(3, dim=-1)
    return rotate_keys(attn, keys, position_embeddings), values


register_architecture(
    ArchSpec(model_types=("gpt_neox",), layers="gpt_neox.layers",
             final_norm="gpt_neox.final_layer_norm",
             project_kv=gpt_neox_kv, cache_kwarg="layer_past", attention="attention")
)
