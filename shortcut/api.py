"""``shortcut.wrap``: attach shortcut to a loaded causal LM and get a removable handle."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from transformers import PreTrainedModel

from .arch import ModelParts, resolve
from .config import ShortcutConfig
from .decode.accounting import ParamSizes, shallow_step_costs
from .decode.draft_length import DraftLengths, ShallowOdds
from .decode.fast import FastBatchDecoder, FastController, FastDecoder, FastStep
from .decode.lossless import (
    ShallowDrafter,
    Trail,
    custom_generate_kwargs,
    make_decoder,
    unpadded,
    unsupported_options,
)
from .decode.prefix import PrefixCache, PromptReuse
from .decode.runtime import FixedPlan, LayerPolicy, LayerRuntime, Stats
from .decode.skip_draft import SkipDrafter, SkipPlan
from .decode.stats import DecodeStats
from .learn.practice import Experience, Learner
from .observe import Observer
from .observe.auto import AutoObserver
from .policy.exits import ExitPolicy
from .policy.heads import ExitHeads
from .skills import folder as skills

if TYPE_CHECKING:
    from transformers import GenerationMixin

logger = logging.getLogger(__name__)

_HANDLES: weakref.WeakKeyDictionary[nn.Module, Shortcut] = weakref.WeakKeyDictionary()


class Shortcut:
    """Handle on a wrapped model. Create it with :func:`wrap` or :func:`load`.

    The model keeps its own API (``model(...)``, ``model.generate(...)``); the handle
    holds what shortcut adds: the policy that decides which layers run, the compute
    statistics, and saving of what was learned.

    What the model practised (:attr:`experience`: the prompt log of prompts and the
    practised sequences that lossless drafts recall) is kept from ``wrap()`` on, with
    no setup: while learning, every plain greedy lossless ``generate`` call adds its
    answer, and later calls that repeat it draft it back for the full model to verify.
    The observer-dependent skills (SAE observer, exit heads, policy: the shallow path)
    come with :meth:`attach_observer` or :meth:`train_observer` (or, by default, an
    observer trained from the model's own traffic) and share that experience.

    Threads: ``model.generate``, :meth:`practice`, :meth:`train_observer` and
    :meth:`save_pretrained` take a per-handle lock, so calls from several threads are
    serialised and each gets exactly the tokens it would get alone. The context
    managers :meth:`disabled` and :meth:`reference`, :meth:`set_policy` and
    :meth:`set_learning` change the handle for every thread. Direct ``model(...)``
    forwards are not locked: while learning is on, run them from one thread at a time.
    """

    def __init__(self, model: PreTrainedModel, parts: ModelParts, config: ShortcutConfig) -> None:
        self.model = model
        self.parts = parts
        self.config = config
        self.fingerprint = skills.fingerprint(model, parts)
        self._runtime = LayerRuntime(model, parts)
        # Decoding installs a per-call layer policy and learning mutates skills: one call
        # at a time (re-entrant: generate calls the model's forward, practice calls generate).
        self._lock = threading.RLock()
        self._removed = False
        self.experience = Experience()  # prompt log and practised sequences, observer or not
        self.learner: Learner | None = None  # the observer-dependent skills, once attached
        self.auto_observer: AutoObserver | None = None  # trains the observer from traffic until one is attached
        self.decode_stats = DecodeStats()  # what lossless and fast decoding did, summed over calls
        self._draft_length: int | None = None  # lossless draft length reached by the latest call
        # Lookup-draft lengths per situation, learned from every verification.
        self._lookup_lengths = DraftLengths(config.lossless.accept_bar)
        # Chances of shallow draft tokens, learned from every verification; they belong
        # to the skills they were measured on and start again when those change.
        self._shallow_odds = ShallowOdds(config.lossless.accept_bar)
        self._odds_for: tuple[int, int] | None = None
        self._skip_plan: SkipPlan | None = None  # layer influences and skip-draft chances, learned while decoding
        self._warned: set[str] = set()
        self._reference = False  # inside reference(): plain generate, counted, not learned
        self.fast: FastController | None = None  # fast mode's audits and calibration
        # Keys and values of text read while learning, by prompt beginning (in memory only).
        self.prefixes = PrefixCache(int(config.prefix_cache_mb * 2**20))

    # -- compute ------------------------------------------------------------------
    @property
    def stats(self) -> Stats:
        """Layers executed per token: ``stats.last`` (latest forward) and ``stats.total``."""
        return self._runtime.stats

    @property
    def num_layers(self) -> int:
        """Number of decoder layers of the wrapped model."""
        return self.parts.num_layers

    @property
    def policy(self) -> LayerPolicy | None:
        """The policy consulted before each decoder layer; ``None`` runs every layer."""
        return self._runtime.policy

    def set_policy(self, policy: LayerPolicy | None) -> None:
        """Install ``policy`` (``None`` for the full path). A :class:`FixedPlan` is
        checked against the model's depth first."""
        self._check_live()
        if isinstance(policy, FixedPlan):
            policy.validate(self.num_layers)
        elif policy is not None and not isinstance(policy, LayerPolicy):
            raise TypeError(f"policy must implement begin/should_run/propagate_kv, got {type(policy).__name__}")
        self._runtime.policy = policy

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the untouched model inside the block (nothing counted, no policy)."""
        self._check_live()
        previous = self._runtime.bypass
        self._runtime.bypass = True
        try:
            yield
        finally:
            self._runtime.bypass = previous

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Run the model's own forward and ``generate`` inside the block, with compute
        still counted in :attr:`stats` and nothing learned: how baselines such as
        ``generate(assistant_early_exit=...)`` are measured on the same counters."""
        self._check_live()
        previous = self._reference
        self._reference = True
        try:
            yield
        finally:
            self._reference = previous

    # -- skills -------------------------------------------------------------------
    @property
    def observer(self) -> Observer | None:
        """The SAE observer, or ``None`` before one is trained or loaded."""
        return self.learner.observer if self.learner else None

    @property
    def heads(self) -> ExitHeads | None:
        """The learned exit heads, or ``None`` without an observer."""
        return self.learner.heads if self.learner else None

    @property
    def exit_policy(self) -> ExitPolicy | None:
        """The learned exit policy, or ``None`` without an observer."""
        return self.learner.policy if self.learner else None

    def attach_observer(self, observer: Observer, *, heads: ExitHeads | None = None,
                        policy: ExitPolicy | None = None) -> None:
        """Give the handle its SAE observer (and, when loading, learned heads and
        policy). From then on full-path forwards of batch 1 are practice (while
        ``config.learning.enabled``), and lossless ``generate`` drafts with the shallow path too.
        The prompt log and practised sequences learned so far are kept; the new heads
        count as fitted on none of the log (fast mode commits only after a re-fit)."""
        self._check_live()
        width = self.parts.unembed.weight.shape[1]
        if observer.d_model != width:
            raise ValueError(f"observer width {observer.d_model} does not match the model's residual width {width}")
        if observer.layer >= self.num_layers:
            raise ValueError(f"observer layer {observer.layer} out of range 0..{self.num_layers - 1}")
        assert self.config.exit_layers is not None  # the handle's config is resolved for its model
        exits = [e for e in self.config.exit_layers if e > observer.layer]
        if not exits:
            raise ValueError(f"no exit layer in {self.config.exit_layers} lies above observer layer {observer.layer}")
        heads = heads or ExitHeads(self.parts, exits)
        policy = policy or ExitPolicy(exits, observer.d_sae, threshold=self.config.learning.policy_threshold)
        if self.auto_observer is not None:  # an observer is here: stop collecting for one
            self.auto_observer.uninstall()
            self.auto_observer = None
        if self.learner is not None:
            self.learner.uninstall()
        self.learner = Learner(self.model, self.parts, observer, heads, policy,
                               consolidate_every=self.config.learning.consolidate_every,
                               fit_steps=self.config.learning.fit_steps,
                               seed=self.config.seed, experience=self.experience)
        self.experience.fitted_log = 0
        self.learner.enabled = self.config.learning.enabled
        self.fast = FastController(min_confidence=self.config.fast.confidence,
                                   min_familiarity=policy.min_familiarity,
                                   target_error_rate=self.config.fast.target_error_rate,
                                   audit_fraction=self.config.fast.audit_fraction, seed=self.config.seed)
        self.learner.install(
            gate=lambda: self._runtime.policy is None and not self._runtime.bypass and not self._reference)

    def train_observer(self, texts: list[str], tokenizer: Any, *, max_tokens: int | None = None,
                       heldout_fraction: float = 0.1, progress: bool = True, **train_kwargs: Any) -> Observer:
        """Train a sae-lens TopK SAE on this model's own residual stream at
        ``config.observer_layers[0]`` over ``texts``, measure it on a held-out slice,
        and attach it as the observer. ``train_kwargs`` go to :func:`observe.train_sae`."""
        from .observe import DEFAULT_MAX_TOKENS, collect_activations, sae_quality, train_sae

        self._check_live()
        assert self.config.observer_layers is not None  # the handle's config is resolved for its model
        layer = self.config.observer_layers[0]
        with self.disabled():
            acts = collect_activations(self.model, self.parts.layers[layer], texts, tokenizer,
                                       max_tokens=max_tokens or DEFAULT_MAX_TOKENS, progress=progress)
        n_heldout = max(1, int(len(acts) * heldout_fraction))
        sae = train_sae(acts[:-n_heldout], seed=self.config.seed, progress=progress, **train_kwargs)
        quality = sae_quality(sae, acts[-n_heldout:])
        observer = Observer(sae, layer, meta={"quality": quality})
        with self._lock:
            self.attach_observer(observer)
        return observer

    def set_learning(self, enabled: bool) -> None:
        """Switch practice on or off (off: skills are frozen)."""
        self.config.learning.enabled = enabled
        if self.learner is not None:
            self.learner.enabled = enabled

    def _generate(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        """``model.generate`` with what was practised: lossless drafting (practised
        sequences recalled, and the shallow path once an observer is attached) with
        full-path verification, or fast mode's committed exits (see decode/lossless.py and
        decode/fast.py). Calls from several threads run one at a time (the handle's lock).

        Fast mode needs the observer's skills to commit anything; without an observer it
        decodes losslessly (recalling practised answers, verified), so its output is the
        unwrapped model's."""
        with self._lock:
            return self._generate_locked(original, *args, **kwargs)

    def _generate_locked(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        if self._removed or self._runtime.bypass or self._reference or self._runtime.policy is not None:
            return original(*args, **kwargs)
        auto = self.auto_observer
        if auto is not None and (trained := auto.take()) is not None:  # trained in the background
            # New heads draw their initial weights: from a seeded stream of their own, not
            # from the caller's, which this call may be about to sample with.
            with torch.random.fork_rng():
                torch.manual_seed(self.config.seed)
                self.attach_observer(trained)
            auto = None
        learner, experience = self.learner, self.experience
        input_ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        mask = kwargs.get("attention_mask")
        # The text without its padding, of every row (of a tensor input).
        rows = unpadded(input_ids, mask) if isinstance(input_ids, torch.Tensor) and input_ids.ndim == 2 else None
        prompt = rows[0] if rows is not None and len(rows) == 1 else None
        commit = learner is not None and self.config.mode == "fast" and prompt is not None and (  # one sequence
            not self.config.fast.practised_prompts_only or learner.was_practised(prompt))  # before it is logged
        if self.config.learning.enabled and prompt is not None:
            experience.log_prompt(prompt)  # the prompt log consolidation reads
        bad = unsupported_options(self.model, kwargs, input_ids)
        if bad:
            self._warn_full_path(", ".join(bad))
            return original(*args, **kwargs)
        assert isinstance(input_ids, torch.Tensor)  # anything else is an unsupported option
        # Fast mode, a batch: the rows whose prompt (padding stripped) was practised
        # verbatim may commit their practised answers (FastBatchDecoder); others are lossless.
        commit_rows: list[bool] = []
        if learner is not None and self.config.mode == "fast" and rows is not None and len(rows) > 1:
            commit_rows = [not self.config.fast.practised_prompts_only or learner.was_practised(row) for row in rows]
        fast = self.fast  # set by attach_observer with the learner
        sequences = experience.sequences if self.config.lossless.recall_sequences else None
        # generate hands custom_generate no streamer or tokenizer: see custom_generate_kwargs.
        kwargs, stream = custom_generate_kwargs(self.model, kwargs)
        collector = None  # collects this call's residuals for the observer being learned
        if auto is not None and self.config.learning.enabled and prompt is not None:
            collector = auto
            collector.begin_call(prompt)
        # A batch-1 prompt starts from the kept keys and values of the longest beginning
        # of it read before (prefix.py); the decoding loop reads only the rest.
        reuse = None
        if prompt is not None:
            self.prefixes.resize(int(self.config.prefix_cache_mb * 2**20))
            reuse = PromptReuse(self.prefixes, keep_text=self.config.learning.enabled, stats=self.decode_stats,
                                on_reuse=collector.prefill_starts_at if collector is not None else None)
        trail = None
        if learner is not None:
            trail = Trail(learner.observer, learner.policy, self.parts.layers[learner.signature_layer],
                          self.decode_stats)
        try:
            if (commit or any(commit_rows)) and learner is not None and fast is not None:
                if fast.calibrated_for != learner.stats.consolidations:
                    fast.recalibrate(learner.stats.consolidations)
            if commit:
                assert learner is not None and fast is not None and trail is not None
                step = FastStep(learner.observer, learner.policy, learner.heads, fast, trail, sequences=sequences)
                fast_decoder = FastDecoder(self._runtime, step, fast, self.decode_stats, streamer=stream,
                                           on_fallback=self._warn_full_path, reuse=reuse)
                return original(*args, custom_generate=fast_decoder, **kwargs)
            if self.config.mode == "fast" and fast is not None and not any(commit_rows):
                fast.lossless_calls += 1  # a prompt never practised verbatim: verify, do not commit
                fast.committed = []
            # Without an observer the drafter recalls practised sequences only.
            observer, heads, policy = (learner.observer, learner.heads, learner.policy) if learner else (None,) * 3
            self._lookup_lengths.accept_bar = self.config.lossless.accept_bar  # the config may change between calls
            if learner is not None and self._odds_for != (id(learner), learner.stats.consolidations):
                self._shallow_odds = self._fresh_shallow_odds(learner)
                self._odds_for = (id(learner), learner.stats.consolidations)
                if self._skip_plan is not None:
                    self._skip_plan.forget_situations()
            self._shallow_odds.accept_bar = self.config.lossless.accept_bar
            skips = self._skip_drafter(learner) if self.config.lossless.skip_drafts else None
            drafter = ShallowDrafter(self.model, self._runtime, observer, heads, policy, trail,
                                     max_draft=self.config.lossless.max_draft,
                                     min_confidence=self.config.lossless.draft_confidence,
                                     stats=self.decode_stats,
                                     on_full_path=learner.learn_recorded if learner else None,
                                     num_draft=self._draft_length, sequences=sequences,
                                     shallow=self.config.lossless.shallow_drafts, lengths=self._lookup_lengths,
                                     copy_text=self.config.lossless.copy_drafts, odds=self._shallow_odds,
                                     skips=skips)
            try:
                decoder: Callable[..., torch.Tensor]
                if any(commit_rows):
                    assert fast is not None  # set with the learner
                    decoder = FastBatchDecoder(drafter, fast, self.decode_stats, commit_rows, streamer=stream,
                                               on_fallback=self._warn_full_path)
                else:
                    decoder = make_decoder(drafter, self.decode_stats, streamer=stream,
                                           on_fallback=self._warn_full_path, reuse=reuse)
                output = original(*args, custom_generate=decoder, **kwargs)
            finally:
                self._draft_length = drafter.num_draft
            # the full model's greedy answer: later calls may recall it
            if self.config.learning.enabled and drafter.plain_greedy:
                experience.sequences.add(output[0].tolist(), start=input_ids.shape[1])
            return output
        finally:
            if trail is not None:
                trail.close()
            if collector is not None:
                collector.end_call(self.config.seed, general=self._general_residuals)
            if stream is not None:  # ended once by the loop; here only when something raised first
                stream.end()

    def _general_residuals(self, n_tokens: int) -> torch.Tensor | None:
        """Up to ``n_tokens`` residuals at the auto observer's layer over the packaged
        general-text passages (train split), from the untouched model (nothing counted);
        ``None`` without a tokenizer (see :mod:`shortcut.observe.auto`)."""
        from .data import DEFAULT_PASSAGES, read_passages
        from .observe import collect_activations

        auto = self.auto_observer
        assert auto is not None and auto.layer is not None  # called by its end_call
        tokenizer = auto.tokenizer or _local_tokenizer(self.model)
        if tokenizer is None:
            logger.info("shortcut: the model's folder has no tokenizer: the observer trains on its traffic alone "
                        "(AutoObserver(tokenizer=...) adds general text)")
            return None
        texts = [r["text"] for r in read_passages(DEFAULT_PASSAGES) if r.get("split") != "heldout"]
        with self.disabled():
            return collect_activations(self.model, self.parts.layers[auto.layer], texts, tokenizer,
                                       max_tokens=n_tokens, progress=False)

    def _current_shallow_odds(self) -> ShallowOdds | None:
        """The shallow-draft chances if they were learned on the current heads (none
        learned since the heads were attached or last consolidated: ``None``)."""
        learner = self.learner
        if learner is None or self._odds_for != (id(learner), learner.stats.consolidations):
            return None
        return self._shallow_odds

    def _restore_draft_odds(self, lengths: DraftLengths, shallow: ShallowOdds) -> None:
        """Take the draft chances a skills folder held (see :func:`load`)."""
        self._lookup_lengths.counts.update(lengths.counts)
        learner = self.learner
        if learner is not None and shallow.counts:
            self._shallow_odds = self._fresh_shallow_odds(learner)
            self._shallow_odds.counts.update(shallow.counts)
            self._odds_for = (id(learner), learner.stats.consolidations)

    def _fresh_shallow_odds(self, learner: Learner) -> ShallowOdds:
        """Shallow-draft chances with nothing learned yet, and what a draft step costs at
        each of ``learner``'s exits (a token is proposed only where its chance pays that)."""
        return ShallowOdds(self.config.lossless.accept_bar,
                           costs=shallow_step_costs(ParamSizes.of(self), learner.heads))

    def _skip_drafter(self, learner: Learner | None) -> SkipDrafter:
        """The skip drafter of one call. Its plan outlives the call; the signature layer
        (where skip sets start) comes from the observer, layer 1 without one."""
        first = learner.signature_layer if learner is not None else 1
        first = min(first, self.parts.num_layers - 1)
        if self._skip_plan is None or self._skip_plan.first_layer != first:
            self._skip_plan = SkipPlan(self.parts.num_layers, first)
        return SkipDrafter(self.model, self._runtime, self._skip_plan, learner.observer if learner else None,
                           self.decode_stats, on_full_path=learner.learn_recorded if learner else None)

    def _warn_full_path(self, reason: str) -> None:
        """Warn once per reason that a generate call takes the full path."""
        if reason not in self._warned:
            if len(self._warned) < 256:  # reasons name option values: keep the set bounded
                self._warned.add(reason)
            logger.warning("shortcut: %s mode cannot honour %s; using the full path", self.config.mode, reason)

    def practice(self, prompts: list[Any], *, rounds: int = 1, max_new_tokens: int = 64,
                 tokenizer: Any = None, shuffle: bool = True, progress: bool = True) -> list[dict[str, Any]]:
        """Practise ``prompts`` (strings, with ``tokenizer``, or token-id tensors
        [1, T]) for ``rounds`` rounds of greedy generation, consolidating the observer's
        skills after each round (without an observer, practice fills the practised
        sequences only). Returns one row of figures per round."""
        from .learn.practice import run_rounds

        self._check_live()
        with self._lock:
            return run_rounds(self, prompts, rounds=rounds, max_new_tokens=max_new_tokens, tokenizer=tokenizer,
                              shuffle=shuffle, progress=progress)

    # -- lifecycle ----------------------------------------------------------------
    def remove(self) -> PreTrainedModel:
        """Detach shortcut; the model is returned exactly as it was. Idempotent."""
        if not self._removed:
            if self.learner is not None:
                self.learner.uninstall()
            if self.auto_observer is not None:
                self.auto_observer.uninstall()
            self.model.__dict__.pop("generate", None)
            self._runtime.uninstall()
            self.prefixes.clear()  # the kept keys and values are memory the model no longer needs
            _HANDLES.pop(self.model, None)
            self._removed = True
        return self.model

    def _check_live(self) -> None:
        if self._removed:
            raise RuntimeError("this shortcut handle was removed; call shortcut.wrap(model) again")

    # -- persistence ----------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, *, overwrite: bool = True) -> Path:
        """Write config and everything learned to ``folder`` (safetensors + json): the
        prompt log and practised sequences always, the observer, exit heads and policy
        when an observer is attached, and before that the residuals the auto observer
        collected to train one (float16, at most its ``min_tokens``). :func:`load`
        resumes from it."""

        def fill(tmp: Path) -> None:
            self.config.save(tmp / "config.json")
            contents = {"config": "config.json"}
            if self.learner is not None:
                contents.update(skills.save_learned(tmp, self.learner, self.fingerprint))
            else:
                contents.update(skills.save_prompt_log(tmp, self.experience))
                auto = self.auto_observer
                residuals = auto.residuals() if auto is not None else None
                if residuals is not None:  # the observer's training data so far: a reload goes on collecting
                    assert auto is not None and auto.layer is not None
                    contents.update(skills.save_observer_buffer(tmp, residuals, auto.layer))
            contents.update(skills.save_draft_odds(tmp, self._lookup_lengths, self._current_shallow_odds()))
            skills.write_manifest(tmp, self.fingerprint, contents)

        with self._lock:
            return skills.write_atomically(folder, fill, overwrite=overwrite)

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"{self.parts.model_type}, {self.num_layers} layers"
        return f"Shortcut({state}, mode={self.config.mode!r})"


def _check_model(model: object) -> None:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"shortcut.wrap needs a transformers PreTrainedModel, got {type(model).__name__}")
    if (
        model.get_output_embeddings() is None
        or not model.can_generate()
        or getattr(model.config, "is_encoder_decoder", False)
    ):
        raise TypeError(
            f"shortcut.wrap needs a causal language model (a *ForCausalLM with an output "
            f"embedding that can generate), got {type(model).__name__}"
        )
    if any(p.is_meta for p in model.parameters()):
        raise ValueError(
            f"{type(model).__name__} has parameters on the meta device; load its weights "
            "(for example with from_pretrained) before wrapping"
        )
    if model in _HANDLES or any(
        getattr(m.__dict__.get("forward"), "__shortcut_wrapper__", False) for m in model.modules()
    ):
        raise RuntimeError(
            f"{type(model).__name__} is already wrapped by shortcut; call handle.remove() first"
        )


def wrap(model: PreTrainedModel, config: ShortcutConfig | None = None, *,
         observer: Observer | AutoObserver | str | Path | bool | None = "auto") -> Shortcut:
    """Attach shortcut to ``model`` in place and return its handle.

    With no learned policy the wrapped model computes exactly what the model computed
    before (bit-identical logits); ``handle.remove()`` restores it completely.

    It practises from the first call: while ``config.learning.enabled``, every plain greedy
    lossless ``generate`` call adds its answer to the practised sequences, and later
    calls whose text goes the way a practised one went draft it back, verified by the
    full model (same tokens as unwrapped, greedy or seeded sampling). An observer
    adds the shallow path on top; ``observer`` says where it comes from:

    - ``"auto"`` (default): trained from the model's own traffic in the background
      once enough tokens were seen (:mod:`shortcut.observe.auto`; pass an
      :class:`~shortcut.observe.auto.AutoObserver` to set how many and how it trains);
    - ``None`` or ``False``: none (practised sequences only, until
      :meth:`Shortcut.attach_observer` or :meth:`Shortcut.train_observer`);
    - an :class:`~shortcut.observe.Observer`: attached at once;
    - a skills folder (``str`` or ``Path``) saved for this base model: its observer.

    Raises:
        TypeError: ``model`` is not a causal LM.
        ValueError: parameters on the meta device, or config layers out of range.
        UnsupportedArchitectureError: no plugin knows the model's ``model_type``.
        RuntimeError: the model is already wrapped.
    """
    if not (observer is None or isinstance(observer, (bool, str, Path, Observer, AutoObserver))):
        raise TypeError(f"observer must be 'auto', None, False, an Observer, an AutoObserver or a skills folder "
                        f"path; got {type(observer).__name__}")
    if observer is True:
        raise ValueError("observer=True is ambiguous: pass 'auto' to train one from traffic, or an Observer")
    _check_model(model)
    parts = resolve(model)
    config = (config or ShortcutConfig()).resolved(parts.num_layers)
    handle = Shortcut(model, parts, config)
    handle._runtime.install()
    original_generate = cast("GenerationMixin", model).generate
    # An instance attribute shadows the class's generate; remove() pops it again.
    model.__dict__["generate"] = functools.update_wrapper(functools.partial(handle._generate, original_generate),
                                                          original_generate)
    _HANDLES[model] = handle
    try:
        if observer == "auto":
            observer = AutoObserver()
        if isinstance(observer, AutoObserver):
            assert config.observer_layers is not None  # resolved above
            layer = config.observer_layers[0]
            observer.install(parts.layers[layer], layer)
            handle.auto_observer = observer
        elif isinstance(observer, (str, Path)):
            handle.attach_observer(_folder_observer(Path(observer), handle))
        elif isinstance(observer, Observer):
            handle.attach_observer(observer)
    except BaseException:
        handle.remove()
        raise
    return handle


def _local_tokenizer(model: PreTrainedModel) -> Any:
    """The tokenizer saved in the model's local folder, or ``None`` (no folder, none in it)."""
    folder = getattr(model, "name_or_path", "") or ""
    if not folder or not Path(folder).is_dir():
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError):
        return None


def _folder_observer(folder: Path, handle: Shortcut) -> Observer:
    """The observer saved in the skills folder ``folder`` for this handle's base model."""
    manifest = skills.read_manifest(folder)
    skills.check_fingerprint(manifest["base_model"], handle.fingerprint, folder)
    learned = skills.load_learned(folder, manifest, handle.parts, handle.fingerprint,
                                  config=skills.load_config(folder, manifest))
    if learned is None:
        raise ValueError(f"skills folder {folder} holds no observer (its manifest lists no 'observer')")
    return learned.observer


def load(model: PreTrainedModel, folder: str | Path) -> Shortcut:
    """Wrap ``model`` with the config and skills saved in ``folder`` by
    :meth:`Shortcut.save_pretrained`. Skills learned on another base model are refused
    before anything is attached.

    A folder written by ``shortcut-finetune --level layerskip`` also holds a LoRA
    adapter (``adapter/``): it is merged into ``model``'s weights in place first, so the
    wrapped model is the adapted model (``remove()`` detaches shortcut but leaves the
    adapter merged)."""
    folder = Path(folder)
    manifest = skills.read_manifest(folder)
    _check_model(model)
    parts = resolve(model)
    skills.check_fingerprint(manifest["base_model"], skills.fingerprint(model, parts), folder)
    # Everything is read and checked before the model changes: a bad file anywhere in
    # the folder leaves the model as it was.
    config = skills.load_config(folder, manifest)
    try:
        config.resolved(parts.num_layers)
    except ValueError as err:
        raise skills.SkillsFileError(f"{folder / 'config.json'}: {err}") from err
    learned = skills.load_learned(folder, manifest, parts, manifest["base_model"], config=config)
    residuals = None
    if learned is not None:
        practised, sequences = learned.practised, learned.sequences
    else:  # practised sequences only (no observer yet), perhaps residuals collected to train one
        practised, sequences = skills.load_prompt_log(folder, manifest, int(parts.unembed.weight.shape[0]))
        observer_layers = config.resolved(parts.num_layers).observer_layers
        assert observer_layers is not None  # resolved
        residuals = skills.load_observer_buffer(folder, manifest, width=int(parts.unembed.weight.shape[1]),
                                                layer=observer_layers[0])
    lengths, shallow = DraftLengths(config.lossless.accept_bar), ShallowOdds(config.lossless.accept_bar)
    skills.load_draft_odds(folder, manifest, lengths, shallow if learned is not None else None, parts.num_layers)
    adapter = manifest.get("contents", {}).get("adapter")
    if adapter:
        skills.merge_adapter(model, skills.inside(folder, adapter, "contents.adapter"))
    handle = wrap(model, config)
    try:
        if learned is not None:
            handle.attach_observer(learned.observer, heads=learned.heads, policy=learned.policy)
        experience = handle.experience
        experience.practised.extend(practised[-experience.log_capacity:])
        experience.sequences.extend(sequences)
        if learned is not None:
            experience.fitted_log = len(experience.practised)  # saved skills: heads fitted on their log
        elif residuals is not None and handle.auto_observer is not None:
            handle.auto_observer.restore(residuals, practised)
        handle._restore_draft_odds(lengths, shallow)
    except BaseException:
        handle.remove()
        raise
    return handle
