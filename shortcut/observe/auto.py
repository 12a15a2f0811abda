"""An observer that trains itself from the wrapped model's own traffic.

``shortcut.wrap(model)`` (``observer="auto"``) gives the handle an :class:`AutoObserver`:
while learning, every ``generate`` call whose prompt it has not seen before leaves the
residual stream at the observer layer of its full-path forwards (the prefill and each
verification; the first position of a prompt, an attention sink, is left out as in
:func:`~shortcut.observe.collect.collect_activations`) in a bounded buffer. A residual
depends only on the tokens up to it, so prompt positions whose prefix an earlier
collected prompt already had (a chat template's system prompt, a shared instruction)
are left out too: they would only add copies of vectors already in. Once
``min_tokens`` vectors are in, the call that filled it builds a seeded TopK SAE (a
moment) and trains it in a background thread, so no ``generate`` call waits for the
training; the training touches no global random state, so seeded sampling meanwhile is
unchanged. The next ``generate`` call after it finished attaches the observer
(``Shortcut.attach_observer``), and the shallow path starts learning from then on.

Until the observer is attached, ``Shortcut.save_pretrained`` saves the buffer
(:meth:`AutoObserver.residuals`) and ``shortcut.load`` puts it back
(:meth:`AutoObserver.restore`), so a second process goes on counting where the first
stopped.

Traffic is narrow (one user's kind of requests), and an observer that knows only it
reconstructs other text less well. So the training set also gets ``general_tokens``
residuals of general text: the packaged encyclopaedic passages
(``shortcut/corpus/passages.jsonl``, train split), run through the model by the call
that filled the buffer (about 3 s for 10,000 tokens on SmolLM2, on CPU; the forwards
stop at the observer layer). This needs the model's tokenizer, found in the model's
local folder or given as ``AutoObserver(tokenizer=...)``; without one, the observer
trains on traffic alone (logged once). These residuals are not kept in the saved buffer:
they are recomputed whenever a training starts. On SmolLM2, 10,000 of them beside 37k
traffic vectors raised held-out explained variance on passages from 0.935 to 0.944 and
on new chat from 0.951 to 0.955 (``docs/benchmarks.md``, Wrap and go).

Default ``min_tokens``: 40,000. On SmolLM2-135M an observer-layer SAE trained on 41k
vectors explains 0.948 of held-out variance, against 0.957 from 176k (``docs/benchmarks.md``,
Observer): a few hundred new chat prompts with 64-token answers reach it, and
the buffer holds ``min_tokens x width`` float16 values (47 MB at SmolLM2's width 576).
A tenth of the vectors is held out to measure the SAE.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..capture import layer_output
from .observer import Observer
from .train import prepare_sae_training, sae_quality

logger = logging.getLogger(__name__)

DEFAULT_MIN_TOKENS = 40_000
DEFAULT_GENERAL_TOKENS = 10_000
HELDOUT_FRACTION = 0.1


class AutoObserver:
    """Collects observer-layer residuals from a handle's calls and trains the observer
    in the background (see the module doc).

    Args:
        min_tokens: residual vectors collected before training starts (also the
            buffer's bound: collection stops there).
        general_tokens: residuals of general text added to the training set (0: none).
        tokenizer: the model's tokenizer, for the general text (default: the one in
            the model's local folder, if any).
        train_kwargs: passed to :func:`~shortcut.observe.train.train_sae` (width
            ``d_sae``, ``k``, ``steps``, ...; ``seed`` defaults to the handle's).
    """

    def __init__(self, min_tokens: int = DEFAULT_MIN_TOKENS, general_tokens: int = DEFAULT_GENERAL_TOKENS,
                 tokenizer: Any = None, **train_kwargs: Any) -> None:
        if min_tokens < 10:
            raise ValueError(f"min_tokens={min_tokens} must be at least 10 (a tenth is held out to measure the SAE)")
        if general_tokens < 0:
            raise ValueError(f"general_tokens={general_tokens} must be >= 0")
        self.min_tokens = min_tokens
        self.general_tokens = general_tokens
        self.tokenizer = tokenizer
        self.general_rows = 0  # general-text residuals the latest training set got
        self.train_kwargs = train_kwargs
        self.layer: int | None = None
        self.tokens = 0
        self.seconds = 0.0  # of the training, once finished
        self.observer: Observer | None = None  # trained and measured, not yet attached
        self.error: BaseException | None = None
        self._chunks: list[torch.Tensor] = []
        self._training_set: torch.Tensor | None = None  # the full buffer, kept until the observer is taken
        self._seen: set[int] = set()  # hashes of the prompts collected from
        self._prefixes: set[int] = set()  # rolling hashes of their prefixes (see _prefix_skip)
        self._skip = 1  # leading positions of this call's prefill to leave out
        self._prompt_length = 0  # of this call's prompt without padding
        self._reused = 0  # leading prompt positions the prefill does not read
        self._armed = False
        self._first = False  # the next forward is a prefill: leave its first position out
        self._hook: Any = None
        self._thread: threading.Thread | None = None

    @property
    def training(self) -> bool:
        """Whether the background training is running."""
        return self._thread is not None and self._thread.is_alive()

    def install(self, layer_module: nn.Module, layer: int) -> None:
        """Read the output of decoder layer ``layer`` (``layer_module``) from now on."""
        self.layer = layer
        self._hook = layer_module.register_forward_hook(self._capture)

    def uninstall(self) -> None:
        """Stop collecting and drop what was collected (idempotent)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._chunks.clear()

    def begin_call(self, prompt: list[int]) -> None:
        """A ``generate`` call with this prompt starts: collect from its forwards if the
        prompt is new (repeats would fill the buffer with the same vectors)."""
        key = hash(tuple(prompt))
        self._armed = self._hook is not None and self.tokens < self.min_tokens and key not in self._seen
        self._first = True
        self._skip = self._prefix_skip(prompt, add=self._armed)
        self._prompt_length = len(prompt)
        self._reused = 0
        self._seen.add(key)

    def prefill_starts_at(self, position: int) -> None:
        """The call's prefill reads its prompt from ``position`` on: the positions before
        were kept from earlier text (``shortcut/decode/prefix.py``)."""
        self._reused = position

    def _prefix_skip(self, prompt: list[int], *, add: bool) -> int:
        """How many leading positions of ``prompt`` to leave out: the first (an
        attention sink) and every one whose prefix an earlier collected prompt had;
        with ``add``, remember this prompt's prefixes."""
        skip, rolling, shared = 1, 0, True
        for position, token in enumerate(prompt):
            rolling = hash((rolling, token))
            if shared and rolling in self._prefixes:
                skip = position + 1
                continue
            shared = False
            if not add:
                break
            self._prefixes.add(rolling)
        return skip

    def end_call(self, seed: int, general: Callable[[int], torch.Tensor | None] | None = None) -> None:
        """The call ended: once the buffer is full, start the training (at most once).
        ``general(n)`` gives up to ``n`` residuals of general text at the observer layer
        (``None``: none to be had)."""
        self._armed = False
        if self.tokens >= self.min_tokens and self._thread is None and self._hook is not None:
            self._start(seed, general)

    def _capture(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._armed:
            return
        hidden = layer_output(output)
        if hidden.shape[0] != 1:
            return
        if self._first and self._reused:  # the prefill reads the prompt from position _reused on
            rows = hidden[0, max(0, self._skip - self._reused):]
        elif self._first:  # the prefill: its first positions may be padding, then the prompt
            rows = hidden[0, max(0, hidden.shape[1] - self._prompt_length) + self._skip:]
        else:
            rows = hidden[0]
        self._first = False
        rows = rows[: self.min_tokens - self.tokens].detach().to("cpu", torch.float16)
        self._chunks.append(rows)
        self.tokens += int(rows.shape[0])

    def _start(self, seed: int, general: Callable[[int], torch.Tensor | None] | None = None) -> None:
        layer = self.layer
        assert layer is not None  # install() set it before anything was collected
        self._training_set = torch.cat(self._chunks)
        self._chunks = []
        self.uninstall()  # nothing more to collect
        generator = torch.Generator().manual_seed(seed)
        acts = self._training_set.float()
        acts = acts[torch.randperm(acts.shape[0], generator=generator)]
        n_heldout = max(1, int(acts.shape[0] * HELDOUT_FRACTION))
        heldout, train = acts[-n_heldout:], acts[:-n_heldout]  # held out: traffic only, what the observer serves
        extra = general(self.general_tokens) if general is not None and self.general_tokens else None
        self.general_rows = 0 if extra is None else int(extra.shape[0])
        if extra is not None and self.general_rows:
            train = torch.cat([train, extra.to("cpu", torch.float32)])
            train = train[torch.randperm(train.shape[0], generator=generator)]
        kwargs = {"seed": seed, "progress": False, **self.train_kwargs}
        # Built here, in the calling thread: only the SAE's seeded initialisation uses
        # the global random generator (its state is restored before the call goes on).
        fit = prepare_sae_training(train, **kwargs)
        self._thread = threading.Thread(target=self._train, args=(fit, heldout, layer),
                                        name="shortcut-observer-training", daemon=True)
        self._thread.start()

    def _train(self, fit: Callable[[], Any], heldout: torch.Tensor, layer: int) -> None:
        start = time.perf_counter()
        try:
            sae = fit()
            quality = sae_quality(sae, heldout)
            self.seconds = time.perf_counter() - start
            self.observer = Observer(sae, layer, meta={"quality": quality})
        except Exception as err:  # the handle goes on without an observer
            self.error = err
            logger.warning("shortcut: training the observer from %d tokens failed: %s", self.tokens, err)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a running training; returns whether none is running any more."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.training

    def take(self) -> Observer | None:
        """The trained observer once (``None`` while collecting, training, or failed)."""
        if self.training or self.observer is None:
            return None
        observer, self.observer = self.observer, None
        self._training_set = None
        quality = observer.meta.get("quality", {})
        logger.info("shortcut: observer trained from the model's own traffic: %d tokens (and %d of general "
                    "text), %.1f s, held-out variance explained %.3f", self.tokens, self.general_rows, self.seconds,
                    quality.get("fve", float("nan")))
        return observer

    def residuals(self) -> torch.Tensor | None:
        """The residuals collected so far, ``[n, width]`` float16 (all of them while the
        training runs, until the trained observer is taken); ``None`` once taken or when
        nothing was collected."""
        if self._training_set is not None:
            return self._training_set
        if not self._chunks:
            return None
        self._chunks = [torch.cat(self._chunks)]
        return self._chunks[0]

    def restore(self, residuals: torch.Tensor, prompts: Iterable[list[int]] = ()) -> None:
        """Put back residuals that :meth:`residuals` gave in an earlier process (at most
        ``min_tokens`` of them are kept), and mark ``prompts`` (the prompt log's) as
        collected from, so asking them again adds no copies. Training starts at the end
        of the next ``generate`` call once the buffer is full."""
        if residuals.ndim != 2:
            raise ValueError(f"residuals must be a 2-D tensor [n, width], got shape {tuple(residuals.shape)}")
        rows = residuals[: max(0, self.min_tokens - self.tokens)].detach().to("cpu", torch.float16)
        if rows.shape[0]:
            self._chunks.append(rows)
            self.tokens += int(rows.shape[0])
        for prompt in prompts:
            self._seen.add(hash(tuple(prompt)))
            self._prefix_skip(prompt, add=True)
