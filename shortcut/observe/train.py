"""Training an observer's TopK SAE with sae-lens's ``SAETrainer``, and measuring it.

The defaults below were chosen by a sweep over layer, width and training text on
SmolLM2-135M (``docs/benchmarks.md``, Observer; ``docs/findings.md``): the aux-k loss with a
100-step dead window keeps dead features near zero, in-domain text is the main lever on
explained variance, and width adds the last bit."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # sae-lens takes seconds to import: import it lazily, only when used.
    from sae_lens import SAE, TopKTrainingSAE

from .observer import Observer

logger = logging.getLogger(__name__)

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


def train_sae(activations: torch.Tensor, **options: Any) -> TopKTrainingSAE:
    """Train a TopK SAE on residual vectors with sae-lens's ``SAETrainer``.

    Same as ``prepare_sae_training(activations, **options)()``.

    Offline (no wandb, no hub). Activations are scaled so their mean norm is
    sqrt(d_in) (sae-lens ``expected_average_only_in``); the trainer folds the scale
    into the weights at the end, so the returned SAE (and the saved inference model)
    encodes raw residuals. ``b_dec`` starts at the data mean; dead features (no firing
    for ``dead_feature_window`` steps) are revived by sae-lens's TopK aux-k loss. The
    learning rate warms up linearly over ``warmup_fraction`` of the steps and decays
    linearly to 0 over the last ``decay_fraction``.

    Args:
        activations: float tensor ``[n, d_in]`` (e.g. from :func:`collect_activations`).
        **options: the keyword arguments of :func:`prepare_sae_training`, with their
            defaults there:
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
    return prepare_sae_training(activations, **options)()


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
