"""Phi-3: queries, keys and values come from one fused ``qkv_proj``."""

from shortcut.arch import ArchSpec, register_architecture, rotate_keys


def phi3_kv(layer, hidden, position_embeddings):
    """Keys/values of a phi3 layer for ``hidden`` (keys rotated), from the fused projection's key/value rows."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    kv_width = attn.num_key_value_heads * attn.head_dim
    q_width = attn.config.num_attention_heads * attn.head_dim
    # Only the key/value rows of the fused projection: a skipped layer pays for K and V alone.
    weight = attn.qkv_proj.weight[q_width:]
    kv = x @ weight.T
    shape = (*x.shape[:-1], -1, attn.head_dim)
    keys = kv[..., :kv_width].view(shape).transpose(1, 2)
    values = kv[..., kv_width:].view(shape).transpose(1, 2)
    return rotate_keys(attn, keys, position_embeddings), values


register_architecture(
    ArchSpec(model_types=("phi3",), layers="model.layers", final_norm="model.norm",
             project_kv=phi3_kv)
)
