"""``shortcut inspect``: what a skills folder learned, read from its files alone (no model),
and optionally the observer's share of decode time measured on the base model."""

from __future__ import annotations

from pathlib import Path

import torch

from .folder import load_draft_odds, read_manifest
from .validate import (
    base_sizes,
    check_heads,
    check_policy,
    expect_object,
    inside,
    read_json,
    read_tensors,
    sae_width,
    token_lists,
)


def _prompt_log_line(folder: Path, contents: dict, vocab_size: int) -> str:
    """The prompt log's line of the report (checked as loading checks it); ``""`` when
    the folder has none."""
    log = inside(folder, contents.get("replay_log", "replay_log.json"), "contents.replay_log")
    if not log.exists():
        return ""
    log_data = expect_object(read_json(log, "prompt log"), log, "the prompt log")
    prompts = token_lists(log_data.get("prompts", []), vocab_size, log, "field 'prompts'")
    sequences = token_lists(log_data.get("sequences", []), vocab_size, log, "field 'sequences'")
    return (f"  prompt log: {len(prompts)} practised prompts, {len(sequences)} practised sequences "
            f"({sum(len(s) for s in sequences)} tokens) that lossless drafts recall")


def _draft_odds_lines(folder: Path, manifest: dict, num_layers: int) -> list[str]:
    """The draft chances the folder kept (checked as loading checks them), a line per
    situation; none when it kept none."""
    from ..decode.draft_length import DraftLengths, ShallowOdds

    lengths, odds = DraftLengths(), ShallowOdds()
    load_draft_odds(folder, manifest, lengths, odds, num_layers)
    if not lengths.counts and not odds.counts:
        return []
    lines = ["  draft chances from verification (a drafted token accepted, given the one before it was):"]
    for (source, opening, agreement), (accepted, rejections) in sorted(lengths.counts.items()):
        where = "opening the answer" if opening else "continuing it"
        lines.append(f"    {source} lookup {where}, {agreement}+ tokens agreeing: "
                     f"{accepted / (accepted + rejections):.2f}")
    for (layer, confidence), (accepted, rejections) in sorted(odds.counts.items()):
        lines.append(f"    shallow draft at exit {layer}, head confidence {confidence:.2f}+: "
                     f"{accepted / (accepted + rejections):.2f}")
    return lines


def describe(folder: Path, *, top: int = 10) -> str:
    """A human-readable report of the skills in ``folder``."""
    manifest = read_manifest(folder)
    base = manifest["base_model"]
    contents = manifest.get("contents", {})
    config_path = inside(folder, contents.get("config", "config.json"), "contents.config")
    config = expect_object(read_json(config_path, "config"), config_path, "the config")
    sizes = base_sizes(base, folder / "shortcut.json")
    lines = [
        f"skills folder {folder}",
        f"  base model: {base['model_type']}, {base['num_layers']} layers, width {base['hidden_size']}, "
        f"weights sha256 {base['weights_sha256'][:12]}",
        f"  mode {config.get('mode')}, observer layers {config.get('observer_layers')}, "
        f"exit layers {config.get('exit_layers')}",
    ]
    if "observer" not in contents:
        log = _prompt_log_line(folder, contents, sizes["vocab_size"])
        lines.append(f"  no observer yet (no shallow path);{log[1:]}" if log else "  nothing learned yet (config only)")
        lines += _draft_odds_lines(folder, manifest, sizes["num_layers"])
        return "\n".join(lines)
    observer_dir = inside(folder, contents["observer"], "contents.observer")
    meta_path = observer_dir / "shortcut_observer.json"
    meta = expect_object(read_json(meta_path, "observer metadata"), meta_path, "the observer metadata") \
        if meta_path.exists() else {}
    d_sae = sae_width(observer_dir)
    quality = meta.get("quality") or {}
    if quality:
        width = quality.get("d_sae")
        lines.append(
            f"  observer: {int(width) if width is not None else '?'} features, held-out variance explained "
            f"{quality.get('fve', float('nan')):.3f}, mean L0 {quality.get('l0', float('nan')):.1f}, "
            f"dead {100 * quality.get('dead_fraction', float('nan')):.1f}%"
        )
    policy_path = inside(folder, contents.get("policy", "policy.safetensors"), "contents.policy")
    policy = read_tensors(policy_path, "policy")
    check_policy(policy, policy_path, d_sae=d_sae, num_layers=sizes["num_layers"])
    heads_path = inside(folder, contents.get("heads", "heads.safetensors"), "contents.heads")
    heads = read_tensors(heads_path, "exit heads")
    check_heads(heads, heads_path, width=sizes["hidden_size"], vocab_size=sizes["vocab_size"],
                num_layers=sizes["num_layers"])
    layers = policy["exit_layers"].tolist()
    trials, agreements = policy["trials"], policy["agreements"]
    bias = torch.sigmoid(policy["bias"])
    lines.append(f"  practised tokens seen: {int(trials.max()) if len(trials) else 0}; "
                 f"shortlist {heads['shortlist'].numel() if 'shortlist' in heads else 0} tokens")
    decisions = policy.get("decisions", torch.zeros(len(layers) + 1))
    total = float(decisions.sum())
    chosen = [f"{100 * float(d) / total:.1f}%" if total else "-" for d in decisions]
    lines.append(f"  decode-time decisions: {int(total)} (share of each exit below; full path {chosen[-1]})")
    lines.append(f"  {'exit after':>10}{'chosen':>8}{'head agrees':>13}{'base rate':>11}{'features > 0':>14}")
    for i, layer in enumerate(layers):
        rate = float(agreements[i] / trials[i]) if trials[i] > 0 else 0.0
        positive = int((policy["weights"][i] > 0).sum())
        lines.append(f"  {layer:>10}{chosen[i]:>8}{100 * rate:>12.1f}%{100 * float(bias[i]):>10.1f}%{positive:>14}")
    weights = policy["weights"][0]
    strongest = torch.topk(weights, min(top, weights.numel()))
    counts = policy["feature_counts"]
    lines.append(f"  SAE features most associated with the shallowest exit (layer {layers[0]}):")
    lines.append("    " + ", ".join(f"#{int(f)} (w={float(w):.2f}, seen {int(counts[f])}x)"
                                   for w, f in zip(strongest.values, strongest.indices) if w > 0) or "    none yet")
    log = _prompt_log_line(folder, contents, sizes["vocab_size"])
    if log:
        lines.append(log)
    lines += _draft_odds_lines(folder, manifest, sizes["num_layers"])
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    lines.append(f"  size on disk: {size / 1e6:.1f} MB")
    return "\n".join(lines)


@torch.no_grad()
def observer_decode_share(folder: Path, model_name: str, *, steps: int = 32, seed: int = 0) -> dict[str, float]:
    """Measure, on the base model, the observer's share of decode time: the median time of
    one SAE encode of a token's residual state over the median time of one single-token
    decode step (full path, with cache), timed back to back in this process."""
    import statistics
    import time

    import shortcut

    model, _ = shortcut.load_model(model_name)
    handle = shortcut.load(model, folder)
    try:
        observer = handle.observer
        if observer is None:
            raise ValueError(f"{folder} holds no observer: nothing to time")
        generator = torch.Generator().manual_seed(seed)
        vocab = model.get_output_embeddings().weight.shape[0]
        ids = torch.randint(0, vocab, (1, 16), generator=generator)
        state = torch.randn(1, observer.d_model, generator=generator)
        from transformers import DynamicCache

        with handle.disabled():
            cache = DynamicCache(config=model.config)
            token = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            step_times, encode_times = [], []
            for _ in range(steps):
                start = time.perf_counter()
                out = model(input_ids=token, cache=cache, use_cache=True)
                step_times.append(time.perf_counter() - start)
                token = out.logits[:, -1:].argmax(-1)
                start = time.perf_counter()
                observer.encode(state)
                encode_times.append(time.perf_counter() - start)
        step, encode = statistics.median(step_times), statistics.median(encode_times)
        return {"decode_step_ms": 1e3 * step, "observer_encode_ms": 1e3 * encode, "share": encode / step}
    finally:
        handle.remove()
