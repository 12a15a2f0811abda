"""Collecting residual-stream activations of a model at one layer, for training an observer.

The forward stops after the observed layer. The first position of each chunk is left out:
such attention-sink-like tokens carry most of the variance and are reconstructed almost
exactly, so keeping them would inflate the measured quality."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # sae-lens takes seconds to import: import it lazily, only when used.
    pass

from ..capture import layer_output

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 200_000


class _StopForward(Exception):
    """Raised from the collection hook so layers after the observed one do not run."""


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
        h = layer_output(output)
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
