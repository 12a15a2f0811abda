"""Property-based fuzzing of ``generate`` on wrapped models against the same model's
plain ``generate``: random generate options (greedy and seeded sampling, temperature,
top-k, top-p, repetition penalty, no-repeat n-grams, minimum and maximum lengths, end of
sequence lists, left padding, padded batches, no cache, streamers, stop strings, options
given through a ``GenerationConfig``) on prompts that are random or repeat, prefix or
extend practised ones, on handles whose skills draft, in lossless and in fast mode.

The helpers here (:func:`fuzz_handle`, :func:`random_case`, :func:`run_case`) also
drive ``benchmarks/fuzz_lossless.py``, which runs the same cases by the thousand.
"""

from __future__ import annotations

import dataclasses
import queue
import random
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import GenerationConfig, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

import shortcut

from .conftest import VOCAB, make_tiny
from .test_practice import PROMPTS, _observer

FUZZ_ARCHS = ("llama", "gpt2", "qwen3", "gemma3_text")
SHARED_BEGINNING = [3 + (7 * i) % 90 for i in range(40)]  # two and a half blocks of kept keys
PAD, EOS = 0, 2


def char_tokenizer():
    """A tokenizer over the model's 96 ids, one printable character each (id i is
    ``chr(32 + i)``), built in-process: what stop strings and text streamers need."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(32 + i) for i in range(VOCAB)]
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=chars[0]))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def fuzz_handle(arch: str):
    """A tiny model of ``arch`` with practised skills that draft (low bars: a random
    tiny model is never confident): ``(model, handle)``."""
    model = make_tiny(arch)
    config = shortcut.ShortcutConfig(observer_layers=[0], exit_layers=[1, 2],
                                     lossless=shortcut.LosslessConfig(draft_confidence=0.0),
                                     fast=shortcut.FastConfig(confidence=0.2),
                                     learning=shortcut.LearningConfig(policy_threshold=0.3, fit_steps=30))
    handle = shortcut.wrap(model, config)
    handle.attach_observer(_observer(model))
    handle.practice(PROMPTS, rounds=2, max_new_tokens=16, progress=False)
    return model, handle


class Recorder(BaseStreamer):
    """Records every ``put`` (as id lists) and counts ``end`` calls."""

    def __init__(self) -> None:
        self.puts: list[list[int]] = []
        self.ends = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts.append([list(value.shape), value.flatten().tolist()])

    def end(self) -> None:
        self.ends += 1


@dataclasses.dataclass
class Case:
    """One fuzzed generate call."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    options: dict[str, Any]  # generation options (keywords, or a GenerationConfig's fields)
    seed: int
    mode: str = "lossless"
    streamer: str | None = None  # None, "record" or "iterator"
    stop_strings: bool = False
    via_config: bool = False
    skip_drafts: bool = False  # lossless drafts with skipped layers instead of exits
    tags: list[str] = dataclasses.field(default_factory=list)


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def random_prompt(rng: random.Random, handle: Any, history: list[list[int]]) -> tuple[list[int], str]:
    """A prompt: random, a practised prompt, a prefix of a practised sequence, a
    practised sequence extended, an earlier call's prompt, or a long beginning many
    calls share followed by random tokens (its keys and values are kept after the first:
    ``shortcut/decode/prefix.py``)."""
    sequences = handle.learner.sequences.sequences
    kind = rng.choice(["random", "practised", "prefix", "extend", "repeat", "shared"])
    if kind == "shared":
        return SHARED_BEGINNING[:rng.randint(17, len(SHARED_BEGINNING))] + _tokens(rng, rng.randint(1, 6)), kind
    if kind == "practised":
        return PROMPTS[rng.randrange(len(PROMPTS))][0].tolist(), kind
    if kind in ("prefix", "extend") and sequences:
        seq = list(sequences[rng.randrange(len(sequences))])
        if kind == "prefix":
            return seq[:rng.randint(2, max(2, len(seq) - 1))], kind
        return seq[:rng.randint(1, len(seq))] + _tokens(rng, rng.randint(1, 4)), kind
    if kind == "repeat" and history:
        return list(history[rng.randrange(len(history))]), kind
    return _tokens(rng, rng.randint(2, 10)), "random"


def random_case(rng: random.Random, handle: Any, history: list[list[int]]) -> Case:
    """Draw one generate call from ``rng``."""
    prompt, kind = random_prompt(rng, handle, history)
    history.append(prompt)
    tags = [f"prompt_{kind}"]
    opts: dict[str, Any] = {}
    n = rng.randint(1, 20)
    if rng.random() < 0.2:
        tags.append("max_length")
    else:
        opts["max_new_tokens"] = n
    if rng.random() < 0.4:
        tags.append("sample")
        opts["do_sample"] = True
        if rng.random() < 0.5:
            opts["temperature"] = rng.choice([0.5, 0.8, 1.3])
            tags.append("temperature")
        if rng.random() < 0.5:
            opts["top_k"] = rng.choice([0, 3, 10, 40])
            tags.append("top_k")
        if rng.random() < 0.4:
            opts["top_p"] = rng.choice([0.5, 0.8, 0.95])
            tags.append("top_p")
    else:
        opts["do_sample"] = False
        tags.append("greedy")
    if rng.random() < 0.2:
        opts["repetition_penalty"] = rng.choice([0.8, 1.2, 1.5])
        tags.append("repetition_penalty")
    if rng.random() < 0.15:
        opts["no_repeat_ngram_size"] = rng.choice([2, 3])
        tags.append("no_repeat_ngram")
    if rng.random() < 0.15:
        opts["min_new_tokens"] = rng.randint(1, n)
        tags.append("min_new_tokens")
    eos = rng.random()
    if eos < 0.2:  # tokens a practised answer or a random text reaches
        seqs = handle.learner.sequences.sequences
        pool = [t for s in seqs for t in s[-6:]] or _tokens(rng, 6)
        opts["eos_token_id"] = [rng.choice(pool) for _ in range(rng.randint(2, 3))]
        tags.append("eos_list")
    elif eos < 0.3:
        opts["eos_token_id"] = rng.randrange(3, VOCAB)
        tags.append("eos_int")

    ids = torch.tensor([prompt])
    mask = None
    layout = rng.random()
    if layout < 0.25:  # a batch of one with left padding
        pad = rng.randint(1, 4)
        ids = torch.cat([torch.full((1, pad), PAD), ids], dim=-1)
        mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, len(prompt), dtype=torch.long)], -1)
        if rng.random() < 0.25:
            mask = None  # generate infers the mask from the pad tokens
            tags.append("left_pad_inferred")
        else:
            tags.append("left_pad")
    elif layout < 0.35:  # a padded batch of two to four rows
        batch = [prompt] + [random_prompt(rng, handle, history)[0] for _ in range(rng.randint(1, 3))]
        width = max(len(p) for p in batch)
        rows = [[PAD] * (width - len(p)) + p for p in batch]
        ids = torch.tensor(rows)
        mask = (ids != PAD).long()
        mask[:, -1] = 1
        tags.append("padded_batch")
    elif layout < 0.4:
        mask = torch.ones_like(ids)
        tags.append("explicit_mask")
    if "max_length" in tags:
        opts["max_length"] = ids.shape[1] + n
    if rng.random() < 0.1:
        opts["min_length"] = ids.shape[1] + rng.randint(1, n)
        tags.append("min_length")
    if rng.random() < 0.06:
        opts["use_cache"] = False
        tags.append("use_cache_off")
    streamer = None
    if ids.shape[0] == 1 and rng.random() < 0.25:
        streamer = rng.choice(["record", "iterator"])
        tags.append(f"streamer_{streamer}")
    stop = ids.shape[0] == 1 and rng.random() < 0.15
    if stop:
        tags.append("stop_strings")
    via_config = rng.random() < 0.15
    if via_config:
        tags.append("generation_config")
    mode = "fast" if rng.random() < 0.25 else "lossless"
    tags.append(mode)
    skips = rng.random() < 0.25
    if skips:
        tags.append("skip_drafts")
    return Case(ids, mask, opts, seed=rng.randrange(2**31), mode=mode, streamer=streamer, stop_strings=stop,
                via_config=via_config, skip_drafts=skips, tags=tags)


def _generate(model: Any, case: Case, extra: dict[str, Any]) -> torch.Tensor:
    kwargs: dict[str, Any] = {"input_ids": case.input_ids, **extra}
    if case.attention_mask is not None:
        kwargs["attention_mask"] = case.attention_mask
    if case.via_config:
        kwargs["generation_config"] = GenerationConfig(pad_token_id=PAD, **case.options)
    else:
        kwargs.update(case.options)
    torch.manual_seed(case.seed)
    return model.generate(**kwargs)


def _one(model: Any, case: Case, tokenizer: Any, stop: list[str] | None) -> tuple[torch.Tensor, Any]:
    """One call; returns its ids and what its streamer saw."""
    extra: dict[str, Any] = {}
    if stop is not None:
        extra.update(stop_strings=stop, tokenizer=tokenizer)
    streamer: Any = None
    if case.streamer == "record":
        streamer = Recorder()
    elif case.streamer == "iterator":
        streamer = TextIteratorStreamer(tokenizer, timeout=5.0)
    if streamer is not None:
        extra["streamer"] = streamer
    out = _generate(model, case, extra)
    if case.streamer == "record":
        return out, (streamer.puts, streamer.ends)
    if case.streamer == "iterator":
        try:
            return out, "".join(streamer)
        except queue.Empty:
            return out, "<stream never ended>"
    return out, None


def run_case(model: Any, handle: Any, case: Case, tokenizer: Any) -> tuple[bool, str | None]:
    """Run ``case`` on the plain model (``handle.disabled()``) and on the wrapped one.
    Returns ``(compared, mismatch)``: fast-mode calls that committed a shallow token are
    not compared (they are fast mode's measured errors, not lossless decoding);
    ``mismatch`` describes the first difference, ``None`` when identical."""
    stop = None
    if case.stop_strings:  # a string the plain answer contains, so that it really stops there
        with handle.disabled():
            full = _generate(model, case, {})
        new = full[0, case.input_ids.shape[1]:].tolist()
        at = random.Random(case.seed).randrange(max(1, len(new)))
        stop = [tokenizer.decode(new[at:at + 2]) or "x"]
    with handle.disabled():
        try:
            ref, ref_stream = _one(model, case, tokenizer, stop)
        except Exception as error:  # the wrapped model must then refuse the call alike
            ref, ref_stream = None, f"{type(error).__name__}: {error}"
    previous = handle.config.mode, handle.config.lossless.skip_drafts
    handle.config.mode, handle.config.lossless.skip_drafts = case.mode, case.skip_drafts
    exits, lossless_calls = handle.fast.exits, handle.fast.lossless_calls
    try:
        out, stream = _one(model, case, tokenizer, stop)
    except Exception as error:
        out, stream = None, f"{type(error).__name__}: {error}"
    finally:
        handle.config.mode, handle.config.lossless.skip_drafts = previous
    if case.mode == "fast" and handle.fast.lossless_calls == lossless_calls:
        case.tags.append("fast_commit_path")  # a prompt practised verbatim: fast mode's own loop ran
    if case.mode == "fast" and handle.fast.exits != exits:
        return False, None
    if ref is None or out is None:
        return True, None if (ref is None and out is None and stream == ref_stream) else \
            f"raised {stream!r}, plain raised {ref_stream!r}"
    if not torch.equal(out, ref):
        return True, f"tokens {out.tolist()} != plain {ref.tolist()}"
    if stream != ref_stream:
        return True, f"streamer saw {stream!r} != plain {ref_stream!r}"
    if case.streamer == "record" and stream[1] != 1:
        return True, f"streamer ended {stream[1]} times"
    return True, None


def describe(case: Case) -> str:
    mask = None if case.attention_mask is None else case.attention_mask.tolist()
    return (f"mode={case.mode} ids={case.input_ids.tolist()} mask={mask} "
            f"options={case.options} seed={case.seed} streamer={case.streamer} stop={case.stop_strings} "
            f"via_config={case.via_config} skip_drafts={case.skip_drafts}")


@pytest.fixture(scope="module")
def fuzz_models():
    handles = {arch: fuzz_handle(arch) for arch in FUZZ_ARCHS}
    yield {arch: (model, handle, []) for arch, (model, handle) in handles.items()}
    for _, handle in handles.values():
        handle.remove()


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@settings(derandomize=True, deadline=None, max_examples=150, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(arch=st.sampled_from(FUZZ_ARCHS), seed=st.integers(0, 2**32 - 1))
def test_wrapped_generate_equals_plain(fuzz_models, tokenizer, arch, seed):
    # The case is drawn from a seed (not from hypothesis draws one by one): what it draws
    # depends on the handle's practised sequences and earlier prompts, which grow.
    model, handle, history = fuzz_models[arch]
    case = random_case(random.Random(seed), handle, history)
    _, mismatch = run_case(model, handle, case, tokenizer)
    assert mismatch is None, f"{arch}: {describe(case)}: {mismatch}"


def test_fuzzing_exercises_drafts(fuzz_models, tokenizer):
    """The fuzzed calls above would prove little if nothing was drafted: a practised
    prompt drafts on every architecture and is accepted."""
    for arch, (model, handle, _) in fuzz_models.items():
        before = handle.decode_stats.accepted
        case = Case(PROMPTS[0], None, {"max_new_tokens": 12, "do_sample": False}, seed=0)
        assert run_case(model, handle, case, tokenizer) == (True, None)
        assert handle.decode_stats.accepted > before, arch
