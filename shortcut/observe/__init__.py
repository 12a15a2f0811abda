"""SAE observers of the residual stream, built on sae-lens 6.x.

An observer is a TopK sparse autoencoder (sae-lens ``TopKTrainingSAE``, trained with
sae-lens's ``SAETrainer``) that reads the residual stream after one decoder layer and
turns the state at the last position into a sparse *signature* (the indices and values
of its top-k features). The policy uses the signature to tell familiar situations from
novel ones.

One module per concern::

    collect.py  collect_activations(model, layer_module, texts, tokenizer=None, *, max_tokens, ...)
    train.py    train_sae(activations, *, d_sae, k, steps, lr, batch_size, seed, ...)
                prepare_sae_training(...) -> fit (the same, built now, trained when called)
                sae_quality(sae, activations) -> {"fve", "l0", "dead_fraction", "mse", ...}
    observer.py Observer(sae, layer).attach(layer_module) / .detach() / .encode(x); Signature
    store.py    save_observer(sae, folder, *, layer, fingerprint, quality=None)
                load_observer(folder, *, d_model, n_layers, expected_fingerprint=None, layer=None)
    auto.py     AutoObserver: trains the observer from a wrapped model's own traffic

The training defaults and the measurements behind them: ``docs/benchmarks.md`` (Observer)
and ``docs/findings.md``.
"""

from .collect import DEFAULT_MAX_TOKENS, collect_activations
from .observer import Observer, Signature
from .store import OBSERVER_META_FILENAME, load_observer, save_observer
from .train import (
                    DEFAULT_BATCH_SIZE,
                    DEFAULT_D_SAE,
                    DEFAULT_K,
                    DEFAULT_LR,
                    DEFAULT_STEPS,
                    prepare_sae_training,
                    sae_quality,
                    train_sae,
)

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
