"""Keys and values of text read before: a prompt that begins the way earlier text did
skips the prefill of that beginning.

Every call reads its prompt with a full forward (the prefill). The keys and values at a
position of an unpadded sequence depend only on the tokens up to it (causal attention,
positions counted from 0), so where a new prompt begins with tokens an earlier call read
(a chat template's system prompt, a task's instruction, the whole prompt of an exact
repeat, a conversation's earlier turns), those positions' keys and values are copied
instead of recomputed and the prefill runs over the rest only. The reused keys and
values are what the full model computed for the same tokens at the same positions; a
forward over the remaining tokens reads them as one over the whole prompt would, exact
up to kernel rounding (the same reordering verification forwards bring, see
``lossless.py``).

Kept in blocks of :data:`BLOCK` tokens. A block is found by the exact tokens it holds
and the block before it (no hash that two texts could share), so a lookup walks the
prompt block by block and stops at the first block not kept. Only forwards that ran
every layer are kept (lossless calls: the whole text the cache holds at the end;
fast calls: the prompt). The store holds at most ``budget_bytes``; when a new block
does not fit, the least used block goes (uses: the calls that read it again; ties: the
one read longest ago), and only a block no kept block continues, so what is read again
and again (practised prompts, shared instructions) stays and one-off text leaves first.
A new block that would be the least used is not kept.

The store empties itself when the model changes: a parameter or buffer replaced, moved,
or modified in place (its storage or its version counter changes, as an optimiser step
or ``load_state_dict`` changes it). Writes through ``.data`` bypass the version counter:
call :meth:`PrefixCache.clear` after such edits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

BLOCK = 16  # tokens per kept block: short enough that little of a prompt is left to read


@dataclass
class _Block:
    """One block of ``BLOCK`` positions: keys and values [1, heads, BLOCK, dim] per layer."""

    id: int
    parent: int  # id of the block before it, 0 for the first block of a text
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    nbytes: int
    uses: int = 1
    last_used: int = 0
    children: set[int] = field(default_factory=set)


def model_fingerprint(model: nn.Module) -> int:
    """Changes when a parameter or buffer of ``model`` is replaced, moved or modified in
    place (storage address and version counter of every tensor)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return hash(tuple((t.data_ptr(), t._version, t.dtype) for t in tensors))


def plain_dynamic(cache: Any) -> bool:
    """Whether every layer of ``cache`` keeps all its keys and values (a sliding-window
    layer keeps its last window only)."""
    layers = getattr(cache, "layers", None) or []
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class PrefixCache:
    """The keys and values of text read before, by block (see the module doc).

    Args:
        budget_bytes: most bytes the kept keys and values may take; 0 keeps nothing.
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes={budget_bytes} must be 0 (keep nothing) or more")
        self.budget_bytes = budget_bytes
        self.nbytes = 0
        self._blocks: dict[tuple[int, tuple[int, ...]], _Block] = {}
        self._by_id: dict[int, tuple[int, tuple[int, ...]]] = {}
        self._next_id = 1
        self._clock = 0
        self._fingerprint: int | None = None

    def __len__(self) -> int:
        return len(self._blocks)

    def clear(self) -> None:
        """Forget every kept block."""
        self._blocks.clear()
        self._by_id.clear()
        self.nbytes = 0

    def resize(self, budget_bytes: int) -> None:
        """Hold at most ``budget_bytes`` from now on (least used blocks go first)."""
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes={budget_bytes} must be 0 (keep nothing) or more")
        self.budget_bytes = budget_bytes
        while self.nbytes > budget_bytes and (victim := self._least_used()) is not None:
            self._remove(victim)

    def _check_model(self, model: nn.Module) -> None:
        fingerprint = model_fingerprint(model)
        if fingerprint != self._fingerprint:
            self.clear()
            self._fingerprint = fingerprint

    def _walk(self, tokens: list[int], limit: int) -> list[_Block]:
        """The kept blocks that begin ``tokens``, in order, covering at most ``limit`` tokens."""
        found: list[_Block] = []
        parent = 0
        for start in range(0, limit - BLOCK + 1, BLOCK):
            block = self._blocks.get((parent, tuple(tokens[start:start + BLOCK])))
            if block is None:
                break
            found.append(block)
            parent = block.id
        return found

    def fill(self, model: nn.Module, tokens: list[int], cache: Any) -> int:
        """Put into the empty ``cache`` the keys and values of the longest kept beginning
        of the unpadded prompt ``tokens`` that leaves at least one token for the prefill
        to read (its logits pick the first new token); returns that beginning's length
        (0 where nothing is kept, or the cache is not empty plain dynamic layers)."""
        if self.budget_bytes == 0 or not plain_dynamic(cache) or cache.get_seq_length() != 0:
            return 0
        self._check_model(model)
        self._clock += 1
        blocks = self._walk(tokens, len(tokens) - 1)
        for block in blocks:
            block.uses += 1
            block.last_used = self._clock
        if blocks:
            for i, layer in enumerate(cache.layers):
                layer.update(torch.cat([b.keys[i] for b in blocks], dim=-2),
                             torch.cat([b.values[i] for b in blocks], dim=-2))
        return len(blocks) * BLOCK

    def keep(self, model: nn.Module, tokens: list[int], cache: Any, length: int) -> None:
        """Keep the keys and values of ``tokens[:length]`` from ``cache``, which holds the
        full model's keys and values for at least those positions (a forward that ran
        every layer wrote them); blocks already kept are left as they are."""
        if self.budget_bytes == 0 or length < BLOCK or not plain_dynamic(cache):
            return
        self._check_model(model)
        self._clock += 1
        length = min(length, len(tokens), *(layer.get_seq_length() for layer in cache.layers))
        parent = 0
        for start in range(0, length - BLOCK + 1, BLOCK):
            key = (parent, tuple(tokens[start:start + BLOCK]))
            block = self._blocks.get(key)
            if block is None:
                block = self._add(key, cache, start)
                if block is None:
                    return  # no room: what follows could not be found without it
            block.last_used = self._clock  # read again just now: not the block to make room
            parent = block.id

    def _add(self, key: tuple[int, tuple[int, ...]], cache: Any, start: int) -> _Block | None:
        end = start + BLOCK
        keys = [layer.keys[:, :, start:end].clone() for layer in cache.layers]
        values = [layer.values[:, :, start:end].clone() for layer in cache.layers]
        nbytes = sum(t.numel() * t.element_size() for t in keys + values)
        while self.nbytes + nbytes > self.budget_bytes:
            victim = self._least_used()
            if victim is None or (victim.uses, victim.last_used) >= (1, self._clock):
                return None  # everything kept is worth more than a new block
            self._remove(victim)
        block = _Block(self._next_id, key[0], keys, values, nbytes, last_used=self._clock)
        self._next_id += 1
        self._blocks[key] = block
        self._by_id[block.id] = key
        if block.parent:
            self._blocks[self._by_id[block.parent]].children.add(block.id)
        self.nbytes += nbytes
        return block

    def _least_used(self) -> _Block | None:
        leaves = [b for b in self._blocks.values() if not b.children]
        return min(leaves, key=lambda b: (b.uses, b.last_used), default=None)

    def _remove(self, block: _Block) -> None:
        key = self._by_id.pop(block.id)
        del self._blocks[key]
        if block.parent in self._by_id:
            self._blocks[self._by_id[block.parent]].children.discard(block.id)
        self.nbytes -= block.nbytes


@dataclass
class PromptReuse:
    """What one batch-1 ``generate`` call does with the kept keys and values: the
    decoding loop fills the cache ``generate`` prepared before the prefill (it sees the
    attention mask ``generate`` settled on, inferred from pad tokens included) and
    keeps the call's text at the end while learning (``keep_text``). ``on_reuse(n)`` hears
    how many leading positions the prefill will not read."""

    store: PrefixCache
    keep_text: bool  # keep the call's text when it ends (while learning)
    stats: Any = None  # a DecodeStats: prompt_reused is counted there
    on_reuse: Callable[[int], None] | None = None
    eligible: bool = False  # set by fill: the prompt reads from position 0 with no mask

    def fill(self, model: nn.Module, input_ids: torch.Tensor, model_kwargs: dict[str, Any],
             chunked: bool = False) -> int:
        """Fill the call's cache with the kept beginning of its prompt, where the prompt
        is one row without padding, at positions counted from 0, read in one piece."""
        positions = model_kwargs.get("position_ids")
        counted = positions is None or (positions.shape[-1] == input_ids.shape[1] and torch.equal(
            positions.reshape(-1), torch.arange(input_ids.shape[1], device=positions.device)))
        self.eligible = (input_ids.shape[0] == 1 and not chunked and counted
                         and model_kwargs.get("attention_mask") is None)
        if not self.eligible:  # keys and values made under a mask or other positions are not reusable
            return 0
        reused = self.store.fill(model, input_ids[0].tolist(), model_kwargs.get("cache"))
        if self.stats is not None:
            self.stats.prompt_reused += reused
        if self.on_reuse is not None:
            self.on_reuse(reused)
        return reused

    def kept(self, model: nn.Module, input_ids: torch.Tensor, cache: Any, length: int) -> None:
        """The call ended: keep the full model's keys and values of ``input_ids[0, :length]``
        (only for a prompt :meth:`fill` found eligible)."""
        if self.keep_text and self.eligible:
            self.store.keep(model, input_ids[0].tolist(), cache, length)
