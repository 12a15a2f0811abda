r"""lm-evaluation-harness model type ``shortcut``: evaluate a wrapped model with lm-eval.

Command line (same arguments as ``lm_eval``; run from anywhere)::

    shortcut-lm-eval --model shortcut \
        --model_args pretrained=smollm2,skills=skills/,mode=lossless \
        --tasks shortcut_socialiqa --device cpu --batch_size 1 --limit 50

lm-eval 0.4.13 (the version tested) looks ``--model`` up in its own registry and
finds no model types that other packages install (no entry points; ``--include_path``
covers tasks only), so the plain ``lm_eval`` command does not know ``shortcut``.
``shortcut-lm-eval`` (= ``python -m shortcut_eval.lm_eval_model``) is lm-eval's own CLI
(``lm_eval.__main__.cli_evaluate``) with two additions made before it parses anything:
this module is imported, which registers ``shortcut`` in lm-eval's model registry, and
``--include_path`` defaults to shortcut's packaged task folder (:data:`TASKS_DIR`).
``--model hf --model_args pretrained=<folder>`` works through it too, for the baseline
on the same tasks. Later lm-eval releases discover model types from the
``lm_eval.models`` entry-point group (upstream docs/plugins.md); shortcut-lm declares
``shortcut = "shortcut_eval.lm_eval_model:ShortcutLM"`` there, so plain
``lm_eval --model shortcut ... --include_path <TASKS_DIR>`` works as well.

From Python, import this module and pass an instance (or, once imported, the name)::

    import lm_eval
    from lm_eval.tasks import TaskManager
    from shortcut_eval.lm_eval_model import TASKS_DIR, ShortcutLM

    lm = ShortcutLM(pretrained="smollm2", skills="skills/", mode="lossless", device="cpu")
    out = lm_eval.simple_evaluate(model=lm, tasks=["shortcut_socialiqa"], limit=50,
                                  task_manager=TaskManager(include_path=str(TASKS_DIR)))

``model_args``:

- ``pretrained``: a packaged alias (``smollm2``, ``gemma3-270m``) or a ``.gguf`` file,
  loaded through :func:`shortcut.load_model` (float32 unless ``dtype`` says otherwise);
  anything else (a local folder, a hub id, a loaded ``PreTrainedModel``) is loaded by
  lm-eval's ``HFLM`` as with ``--model hf``.
- ``skills``: a skills folder saved by ``handle.save_pretrained`` / ``shortcut
  practice``; loaded with :func:`shortcut.load` (skills of another base model are
  refused). Without it the model is wrapped with :func:`shortcut.wrap`, which computes
  exactly what the model computed before.
- ``mode``: ``lossless`` or ``fast``; default: the skills folder's mode, else lossless.
- ``learn``: practise during the evaluation (default ``False``: skills stay frozen, so
  scores do not depend on the order of requests).

Every other argument is ``HFLM``'s (``batch_size``, ``device``, ``dtype``,
``max_length``, ...).

What changes under shortcut: log-likelihood requests (``multiple_choice``,
``loglikelihood_rolling``) run the model's forward pass, which shortcut leaves on the
full path in both modes, so their scores equal ``--model hf``'s bit for bit.
``generate_until`` requests go through ``model.generate``: lossless mode drafts on
learned shallow paths and verifies with the full model, so greedy output equals
``--model hf``'s; fast mode commits shallow-path tokens and may differ. The results'
``config.shortcut`` records mode, skills, layers per token and draft counters.

The tasks in :data:`TASKS_DIR` read committed JSONL files through :func:`load_jsonl`:
``shortcut_socialiqa`` (multiple choice by log-likelihood over the 100 SocialIQA items
of ``shortcut_eval/data/choice.jsonl``) and ``shortcut_trivia`` (greedy ``generate_until``
over the 35 trivia prompts of ``shortcut_eval/data/prompts.jsonl`` that carry a reference
answer, scored by :func:`trivia_results`; instruct models such as SmolLM2 need
``--apply_chat_template``, which also makes the input exactly what ``shortcut
practice`` feeds the model for the same prompt).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

import shortcut
from shortcut import models
from shortcut.config import LearningConfig, ShortcutConfig

logger = logging.getLogger(__name__)

try:  # lm-eval is optional (pip install "shortcut-lm[lm-eval]")
    from lm_eval.api.registry import model_registry
    from lm_eval.models.huggingface import HFLM
except ModuleNotFoundError as err:  # keep this module importable: shortcut imports every plugin
    _LM_EVAL_MISSING: ModuleNotFoundError | None = err
    HFLM = object  # type: ignore[assignment,misc]
    model_registry = None
else:
    _LM_EVAL_MISSING = None

MODEL_NAME = "shortcut"
"""The name of the model type in lm-eval's registry (``--model shortcut``)."""

EVALS_DIR = Path(__file__).resolve().parent
TASKS_DIR = EVALS_DIR / "lm_eval_tasks"
"""shortcut's lm-eval task YAMLs (pass as ``--include_path`` / ``TaskManager(include_path=...)``)."""
DATA_DIR = EVALS_DIR / "data"


def is_shortcut_name(pretrained: object) -> bool:
    """True when ``pretrained`` is a name that :func:`shortcut.load_model` must load:
    a packaged alias or a ``.gguf`` file (HFLM loads folders and hub ids itself)."""
    if not isinstance(pretrained, (str, Path)):
        return False
    name = str(pretrained)
    return models.ALIASES.get(name.lower(), name.lower()) in models.PACKAGED or name.endswith(".gguf")


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """HFLM's ``dtype`` argument as a torch dtype; ``auto`` means float32, the dtype
    :func:`shortcut.load_model` dequantises GGUF files to."""
    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    from lm_eval.models.utils import get_dtype

    return get_dtype(dtype)


def _torch_device(device: str | None) -> str:
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


class ShortcutLM(HFLM):  # type: ignore[misc,valid-type]
    """lm-eval's ``HFLM`` on a model wrapped by shortcut (``--model shortcut``).

    Args:
        pretrained: packaged alias or ``.gguf`` file (loaded by
            :func:`shortcut.load_model`), or whatever ``HFLM`` accepts (folder, hub id,
            loaded ``PreTrainedModel``).
        skills: skills folder to load with :func:`shortcut.load`; ``None`` wraps the
            model with :func:`shortcut.wrap` and no skills.
        mode: ``"lossless"`` or ``"fast"``; ``None`` keeps the skills folder's mode
            (lossless without skills).
        learn: practise during evaluation (default off: frozen skills).
        tokenizer, device, dtype, **kwargs: as for ``HFLM``. ``device=None`` picks
            CUDA when available, else CPU.

    Attributes:
        handle: the :class:`shortcut.Shortcut` handle of the wrapped model.
    """

    def __init__(
        self,
        pretrained: Any = models.DEFAULT_MODEL,
        skills: str | Path | None = None,
        mode: str | None = None,
        learn: bool = False,
        tokenizer: Any = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = "auto",
        **kwargs: Any,
    ) -> None:
        if _LM_EVAL_MISSING is not None:
            raise ModuleNotFoundError(
                'the shortcut lm-eval model needs lm-eval: pip install "shortcut-lm[lm-eval]"'
            ) from _LM_EVAL_MISSING
        if mode is not None:
            ShortcutConfig(mode=mode)  # a bad mode fails here, before any loading
        if isinstance(pretrained, Path):
            pretrained = str(pretrained)  # HFLM loads only str names; other objects it takes as models
        name = pretrained if isinstance(pretrained, str) else None
        if is_shortcut_name(pretrained):
            device = _torch_device(device)
            model, loaded_tokenizer = shortcut.load_model(str(pretrained), dtype=_torch_dtype(dtype), device=device)
            pretrained = model
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, device=device, dtype=dtype, **kwargs)
        if name is not None:
            self.pretrained = name  # recorded in the results' config instead of the model object
        self.skills = str(skills) if skills else None
        self.handle = self._attach(self.skills, mode, bool(learn))

    def _attach(self, skills: str | None, mode: str | None, learn: bool) -> shortcut.Shortcut:
        """Wrap ``self.model`` (with the skills in ``skills``, when given)."""
        if skills:
            handle = shortcut.load(self.model, skills)
            if mode is not None:
                handle.config.mode = mode
        else:
            config = ShortcutConfig(mode=mode or "lossless", learning=LearningConfig(enabled=learn))
            handle = shortcut.wrap(self.model, config)
        handle.set_learning(learn)
        logger.info("shortcut: %r, skills %s", handle, skills or "none")
        return handle

    def get_model_info(self) -> dict:
        """HFLM's model information plus shortcut's: mode, skills folder, learning,
        decoder layers per token and lossless draft counters of this evaluation."""
        info = super().get_model_info()
        handle = self.handle
        info["shortcut"] = {
            "mode": handle.config.mode,
            "skills": self.skills,
            "learn": handle.config.learning.enabled,
            "layers_per_token": handle.stats.total.layers_per_token,
            "num_layers": handle.num_layers,
            "draft": handle.decode_stats.as_dict(),
        }
        return info


def load_jsonl(jsonl: str = "choice.jsonl", split: str = "test", where: str | None = None,
               **_metadata: Any) -> Any:
    """Task data from a committed JSONL file, for task YAMLs' ``custom_dataset``.

    ``jsonl`` is relative to shortcut's eval data folder (``shortcut_eval/data``) unless
    absolute; ``where`` keeps only rows whose field of that name is not null. lm-eval
    also passes the task metadata (model arguments included) as keyword arguments; they
    are ignored.

    Returns:
        ``datasets.DatasetDict`` with the one split ``split``.
    """
    import datasets

    path = Path(jsonl)
    if not path.is_absolute():
        path = DATA_DIR / path
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if where:
        rows = [row for row in rows if row.get(where) is not None]
    if not rows:
        raise ValueError(f"{path} has no rows" + (f" with a {where!r} field" if where else ""))
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def _normalise(text: str) -> str:
    """Lower case, punctuation (ASCII and typographic) dropped, whitespace collapsed."""
    kept = "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower())
    return " ".join(kept.split())


def trivia_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Scores of one ``shortcut_trivia`` answer (the task's ``process_results``):
    ``exact_match``, the answer equals the reference, and ``contains``, the reference
    appears in the answer as whole words; both after :func:`_normalise`. Small
    instruct models answer in sentences, which ``exact_match`` never credits."""
    answer, reference = _normalise(results[0]), _normalise(doc["reference"])
    return {
        "exact_match": float(answer == reference),
        "contains": float(bool(reference) and f" {reference} " in f" {answer} "),
    }


def main(argv: list[str] | None = None) -> None:
    """lm-eval's CLI with the ``shortcut`` model type registered and
    ``--include_path`` defaulting to :data:`TASKS_DIR`. ``argv`` defaults to
    ``sys.argv[1:]``; arguments are those of ``lm_eval``."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        args += ["--include_path", str(TASKS_DIR)]
    saved = sys.argv
    sys.argv = ["lm_eval", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if model_registry is not None and MODEL_NAME not in model_registry:
    # A lazy "module:object" entry, not the class: under ``python -m`` this file runs
    # twice (as __main__ and as this module) and must not register two classes. An
    # entry already there (the first run's, or a newer lm-eval's entry-point
    # placeholder for the same object) is left alone.
    model_registry.register(MODEL_NAME, target="shortcut_eval.lm_eval_model:ShortcutLM")


if __name__ == "__main__":
    main()
