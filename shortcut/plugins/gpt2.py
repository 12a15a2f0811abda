"""GPT-2: fused ``c_attn`` (a Conv1D, weight is [in, out]), learned absolute positions
(no rotary), and the cache passed to each block positionally."""

from shortcut.arch import ArchSpec, register_architecture


def gpt2_kv(layer, hidden, position_embeddings):
    """Keys/values of a gpt2 layer for ``hidden`` (no rotary embedding)."""
    attn = layer.attn
    x = layer.ln_1(hidden)
    width = attn.split_size
    weight = attn.c_attn.weight[:, width:]
    kv = x @ weight + attn.c_attn.bias[width:]
    shape = (*x.shape[:-1], -1, attn.head_dim)
    keys = kv[..., :width].view(shape).transpose(1, 2)
    values = kv[..., width:].view(shape).transpose(1, 2)
    return keys, values


register_architecture(
    ArchSpec(model_types=("gpt2",), layers="transformer.h", final_norm="transformer.ln_f",
             project_kv=gpt2_kv, cache_position=1, attention="attn")
)
