"""Layer skip as well as early exit: do learned, per-situation skip sets pay on top of
the exits, on the packaged SmolLM2-135M-Instruct?

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/bench_skips.py              # 8 prompts per set, 64 tokens
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/bench_skips.py --prompts 30 # scale up (about 4x longer)

The default run takes about 6-7 minutes single-threaded on a shared 2-core machine
(1.5 of them generating the continuations, which are cached under
$SHORTCUT_CACHE/bench_answers for later runs).

Practised prompts (shortcut_eval/data/prompts.jsonl, split "practice") get their greedy
continuation from the plain model; every generated position is then examined
teacher-forced. A "query" is one position decoded against the full model's keys and
values of everything before it (what a drafted token sees after verification), with its
own per-token skip mask: many queries, each with its own mask, run as one batched
forward over a cache of the full-path prefix (a custom 4D attention mask lets each query
see the cache up to its position and itself). A skipped layer returns its input; the
query's keys/values there come from its input state, as with ``FixedPlan`` and
``propagate_kv``. Checked at start against the library: queries without skips give the
full forward's tokens, a query with a skip set equals a decode step under
``handle.set_policy(FixedPlan(skip=...))``; after the search, the largest oracle skip
sets are replayed as FixedPlan decode steps.

Oracles, per token:
  exit        the shallowest layer L (= layers run) whose logit lens (final norm +
              unembedding), or whose exit head of the skills folder (shortlist scoring,
              layers 7/11/15/19), names the full model's token;
  skip        full depth, greedy: drop the layer whose removal changes the final
              distribution least (KL) while the top-1 token stays; repeat;
  exit+skip   the same greedy inside the exit's shallow path (layers < L), read out
              where the exit reads (head or lens at L).
  The first greedy step is the per-position single-skip agreement matrix (every layer
  alone); later steps re-measure the --search-width candidates with the smallest KL so
  far (0: all of them) and drop a candidate once it broke the token.

Learned on the practice prompts ("round 1"), then reused:
  global      one static skip set for every token: the largest set the greedy finds
              that keeps --target of the practised tokens (and one at --relaxed);
  per prompt  one set per practised prompt; a new prompt uses the practised prompt with
              the nearest mean SAE signature;
  per cluster one set per k-means cluster of practised tokens' SAE signatures;
  per token   the oracle exit / skip set of the nearest practised token's signature.
  Every lookup except the global sets is gated like the exit policy: a token whose SAE
  signature is not within cosine --familiarity of a practised one takes the full path.
  "exit + ..." rows skip inside the shallow path of the per-token exit.
Test sets: exact repeats (the practice prompts again, rebuilt from a fresh forward),
their near-duplicates (shortcut_eval/data/near_duplicates.jsonl) and novel prompts (split
"novel"). Agreement = the path's top-1 equals the full model's token, measured two ways:
"iso", each token alone after a verified prefix (a draft's first token), and "draft",
tokens drafted in windows of --window tokens, later ones attending to earlier ones'
keys/values (propagated from the state that reached a skipped layer, absent from the
exit up; a token needing a deeper exit than an earlier one in its window starts a new
window, as the drafter's ceiling does). For exits without skips both are equal.

Also: the signature a token gets after its memorised skips below the observer's layer
(the policy decides there, so such skips must be chosen before it), how similar the
oracle sets of the same situation in different prompts are, and the wall time of one
decode step (batch 1, one token, KV cache) with a skip set vs an exit that runs the
same number of layers, paired, median; with K/V propagation into the layers not run
(fast mode, consistent cache) and without (drafting, cache cropped).

Needs a skills folder (default runs/eval/full/skills, written by
``shortcut-eval practice --out runs/eval/full``) for the exit heads and the SAE observer; without it the exits
are logit lens only and the signature-based rows are left out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import shortcut  # noqa: E402
from shortcut.data import prompt_input_ids, read_jsonl, read_prompts  # noqa: E402
from shortcut.models import cache_root  # noqa: E402
from shortcut.policy.heads import collect_states  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "shortcut_eval" / "data"
FINAL = "final"  # readout kinds: "final" (L = num_layers), "lens", "head"


class _Stop(Exception):
    pass


def _crop(cache: Any, length: int) -> None:
    for layer in cache.layers:
        if layer.is_initialized and layer.get_seq_length() > length:
            layer.crop(length - layer.get_seq_length())


# -- per-token skipping inside one batched forward --------------------------------------
class TokenSkips:
    """Forward hooks on every decoder layer: rows whose mask is set at layer ``i`` get
    the layer's input back as its output (attention and MLP discarded); ``capture``
    records the input of chosen layers; ``stop_at`` ends the forward there."""

    def __init__(self, layers: Any) -> None:
        self.mask: torch.Tensor | None = None  # [q, num_layers] bool
        self.capture: set[int] = set()
        self.captured: dict[int, torch.Tensor] = {}
        self.stop_at: int | None = None
        # per-layer visibility of the query keys (drafting: no K/V above a token's exit)
        self.key_cols: torch.Tensor | None = None  # [num_layers, q] bool
        self.handles = []
        for i, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._post(i), with_kwargs=True))

    def _pre(self, i: int):
        def hook(module, args, kwargs):
            if i in self.capture:
                self.captured[i] = (args[0] if args else kwargs["hidden_states"])[0].detach()
            if self.stop_at is not None and i >= self.stop_at:
                raise _Stop
            if self.key_cols is not None:
                att = kwargs["attention_mask"].clone()
                q = self.key_cols.shape[1]
                att[..., -q:] &= self.key_cols[i][None, None, None, :]
                return args, {**kwargs, "attention_mask": att}
            return None
        return hook

    def _post(self, i: int):
        def hook(module, args, kwargs, output):
            if self.mask is None or not bool(self.mask[:, i].any()):
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            out = torch.where(self.mask[:, i][None, :, None], hidden, out)
            return (out, *output[1:]) if isinstance(output, tuple) else out
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class Ctx:
    """One prompt + greedy continuation, teacher-forced; the answer positions."""

    name: str
    pid: str
    ids: torch.Tensor          # [1, T]
    pos: torch.Tensor          # [n] positions whose next token is an answer token
    target: torch.Tensor       # [n] full model's top-1 there
    states: dict[int, torch.Tensor]  # l -> [n, d], input of layer l (l = num_layers: last output)
    cache: Any                 # full-path K/V of ids[:, :T-1]
    sig: torch.Tensor | None = None  # [n, d_sae] L2-normalised dense SAE signature
    prompt_sig: torch.Tensor | None = None
    _ref: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.pos.numel())


class Bench:
    def __init__(self, model, handle, heads, observer, batch_rows: int) -> None:
        self.model, self.handle, self.heads, self.observer = model, handle, heads, observer
        self.parts = handle.parts
        self.L = handle.num_layers
        self.head_layers = set(heads.layers) if heads is not None else set()
        self.skips = TokenSkips(self.parts.layers)
        self.batch_rows = batch_rows
        self.rows_run = 0

    # -- contexts ------------------------------------------------------------------
    @torch.no_grad()
    def context(self, name: str, pid: str, seq: torch.Tensor, plen: int) -> Ctx:
        ids = seq.view(1, -1)
        T = ids.shape[1]
        with self.handle.disabled():
            states, _, nxt = collect_states(self.model, self.parts, ids, range(self.L + 1))
            cache = self.model(input_ids=ids[:, : T - 1], use_cache=True).cache
        pos = torch.arange(plen - 1, T - 1)
        ctx = Ctx(name, pid, ids, pos, nxt[pos], {l: s[pos] for l, s in states.items()}, cache)
        if self.observer is not None:
            layer = self.observer.layer + 1
            ctx.sig = self.dense(self.observer.encode(ctx.states[layer]))
            ctx.prompt_sig = F.normalize(self.dense(self.observer.encode(states[layer][: plen - 1])).mean(0), dim=0)
        return ctx

    def dense(self, sig) -> torch.Tensor:
        out = torch.zeros(sig.indices.shape[0], self.observer.d_sae)
        out.scatter_(1, sig.indices, sig.values.float())
        return F.normalize(out, dim=1)

    # -- readouts ------------------------------------------------------------------
    def readout(self, layer: int, kind: str, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs over the scored set, vocabulary id of each column or None)."""
        if kind == "head":
            return torch.log_softmax(self.heads.shortlist_logits(layer, hidden).float(), -1), self.heads.shortlist
        logits = self.parts.unembed(self.parts.final_norm(hidden))
        return torch.log_softmax(logits.float(), -1), None

    def reference(self, ctx: Ctx, layer: int, kind: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Unskipped readout log-probs of the answer positions ``rows`` (all if None). The
        final distribution and head readouts are kept; lens readouts (full vocabulary at
        any layer) are recomputed, they would not fit in memory for every layer."""
        if kind == "lens" and layer < self.L:
            states = ctx.states[layer] if rows is None else ctx.states[layer][rows]
            return self.readout(layer, kind, states)[0]
        key = (layer, kind)
        if key not in ctx._ref:
            ctx._ref[key] = self.readout(layer, kind, ctx.states[layer])[0]
        return ctx._ref[key] if rows is None else ctx._ref[key][rows]

    # -- queries -------------------------------------------------------------------
    @torch.no_grad()
    def query(self, ctx: Ctx, idx: torch.Tensor, mask: torch.Tensor, exit_layer: torch.Tensor,
              kind: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``idx`` (answer-position indices, repeats allowed), each with its own skip
        mask [q, L] and readout (``exit_layer``, ``kind``). Returns (top-1 ok [q],
        KL(unskipped readout || skipped readout) [q])."""
        oks, kls = [], []
        for start in range(0, len(idx), self.batch_rows):
            sl = slice(start, start + self.batch_rows)
            ok, kl = self._query(ctx, idx[sl], mask[sl], exit_layer[sl], kind[sl])
            oks.append(ok)
            kls.append(kl)
        return torch.cat(oks), torch.cat(kls)

    def _query(self, ctx, idx, mask, exit_layer, kind, window: torch.Tensor | None = None):
        """One batched forward. ``window`` [q] (optional): queries of the same window id
        also attend to each other causally, as the tokens of one draft do; a query's
        key/value at a layer it skipped is propagated from its input state there, and
        at layers from its exit up it has none (the drafter writes none there)."""
        q = len(idx)
        pos = ctx.pos[idx]
        C = ctx.ids.shape[1] - 1
        att = torch.zeros(1, 1, q, C + q, dtype=torch.bool)
        att[0, 0, :, :C] = torch.arange(C)[None, :] < pos[:, None]
        att[0, 0, torch.arange(q), C + torch.arange(q)] = True
        if window is not None:  # the verified prefix ends where the query's window starts
            same = window[:, None] == window[None, :]
            start = torch.where(same, pos[None, :], torch.full_like(same, C, dtype=torch.long)).min(1).values
            att[0, 0, :, :C] = torch.arange(C)[None, :] < start[:, None]
            att[0, 0, :, C:] |= same & (pos[None, :] <= pos[:, None])
            self.skips.key_cols = torch.arange(self.L)[:, None] < exit_layer[None, :]
        top = int(exit_layer.max())
        self.skips.mask = mask
        self.skips.capture = {int(l) for l in exit_layer.unique() if int(l) < self.L}
        self.skips.captured = {}
        self.skips.stop_at = top if top < self.L else None
        logits = None
        try:
            with self.handle.disabled():
                out = self.model(input_ids=ctx.ids[0, pos][None], position_ids=pos[None], attention_mask=att,
                                 cache=ctx.cache, use_cache=True)
            logits = out.logits[0]
        except _Stop:
            pass
        finally:
            self.skips.mask, self.skips.capture, self.skips.stop_at, self.skips.key_cols = None, set(), None, None
            _crop(ctx.cache, C)
        self.rows_run += q
        ok = torch.zeros(q, dtype=torch.bool)
        kl = torch.zeros(q)
        for layer in exit_layer.unique().tolist():
            for k in set(kind):
                rows = ((exit_layer == layer) & torch.tensor([kk == k for kk in kind])).nonzero().view(-1)
                if not len(rows):
                    continue
                if layer == self.L:
                    logp = torch.log_softmax(logits[rows].float(), -1)
                    vocab = None
                    ref = self.reference(ctx, self.L, FINAL, idx[rows])
                else:
                    logp, vocab = self.readout(layer, k, self.skips.captured[layer][rows])
                    ref = self.reference(ctx, layer, k, idx[rows])
                top1 = logp.argmax(-1)
                if vocab is not None:
                    top1 = vocab[top1]
                ok[rows] = top1 == ctx.target[idx[rows]]
                kl[rows] = (ref.exp() * (ref - logp)).sum(-1)
        self.last_states, self.skips.captured = self.skips.captured, {}
        return ok, kl

    def masks(self, sets: list[frozenset[int] | set[int]]) -> torch.Tensor:
        m = torch.zeros(len(sets), self.L, dtype=torch.bool)
        for r, s in enumerate(sets):
            if s:
                m[r, list(s)] = True
        return m

    # -- exit oracle -----------------------------------------------------------------
    @torch.no_grad()
    def exit_oracle(self, ctx: Ctx, lens: bool = True) -> tuple[torch.Tensor, list[str]]:
        """Shallowest layer whose lens (if ``lens``) or exit head names the full model's
        token; the full depth otherwise."""
        exit_layer = torch.full((ctx.n,), self.L)
        kind = [FINAL] * ctx.n
        for layer in range(self.L - 1, 0, -1):  # deepest first, so the shallowest wins
            hits = []
            if lens:
                hits.append(("lens", self.reference(ctx, layer, "lens").argmax(-1) == ctx.target))
            if layer in self.head_layers:
                hits.append(("head", self.heads.shortlist[self.reference(ctx, layer, "head").argmax(-1)] == ctx.target))
            for name, hit in hits:  # the head wins over the lens at the same layer
                for i in hit.nonzero().view(-1).tolist():
                    exit_layer[i] = layer
                    kind[i] = name
        return exit_layer, kind


# -- greedy searches -------------------------------------------------------------------
def single_matrix(bench: Bench, ctx: Ctx, exit_layer: torch.Tensor, kind: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """ok[i, j], kl[i, j]: position i with only layer j skipped (j < its exit; else False/inf)."""
    n, L = ctx.n, bench.L
    rows = [(i, j) for i in range(n) for j in range(int(exit_layer[i]))]
    ok = torch.zeros(n, L, dtype=torch.bool)
    kl = torch.full((n, L), math.inf)
    if not rows:
        return ok, kl
    idx = torch.tensor([r[0] for r in rows])
    js = torch.tensor([r[1] for r in rows])
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    mask[torch.arange(len(rows)), js] = True
    # rows sorted by exit so a batch stops early when its exits are shallow
    order = exit_layer[idx].argsort(stable=True)
    o, k = bench.query(ctx, idx[order], mask[order], exit_layer[idx][order], [kind[i] for i in idx[order].tolist()])
    ok[idx[order], js[order]] = o
    kl[idx[order], js[order]] = k
    return ok, kl


def greedy_tokens(bench: Bench, ctx: Ctx, exit_layer, kind, ok1, kl1, width: int) -> list[frozenset[int]]:
    """Per position: greedily the largest skip set (below its exit) that keeps its top-1.
    Each step tries the ``width`` candidates (0: all) with the smallest KL measured so
    far and adds the one with the least KL that keeps the token; a candidate that broke
    the token is not tried again."""
    n = ctx.n
    cur: list[set[int]] = [set() for _ in range(n)]
    score: list[dict[int, float]] = []
    for i in range(n):  # step 1 is the single-skip matrix
        score.append({j: float(kl1[i, j]) for j in ok1[i].nonzero().view(-1).tolist()})
        if score[i]:
            j = min(score[i], key=score[i].get)
            cur[i].add(j)
            del score[i][j]
    alive = [i for i in range(n) if cur[i] and score[i]]
    while alive:
        rows, cand, tags = [], [], []
        for i in alive:
            ranked = sorted(score[i], key=score[i].get)
            for j in ranked[:width] if width else ranked:
                rows.append(i)
                cand.append(cur[i] | {j})
                tags.append(j)
        idx = torch.tensor(rows)
        o, k = bench.query(ctx, idx, bench.masks(cand), exit_layer[idx], [kind[i] for i in rows])
        best: dict[int, tuple[float, int]] = {}
        for r, (i, j) in enumerate(zip(rows, tags)):
            if bool(o[r]):
                score[i][j] = float(k[r])
                if score[i][j] < best.get(i, (math.inf, -1))[0]:
                    best[i] = (score[i][j], j)
            else:
                del score[i][j]
        for i, (_, j) in best.items():
            cur[i].add(j)
            del score[i][j]
        alive = [i for i in alive if score[i]]
    return [frozenset(s) for s in cur]


def greedy_groups(bench: Bench, ctxs: list[Ctx], groups: list[torch.Tensor], exits: list[torch.Tensor],
                  kinds: list[list[str]], singles: list[tuple[torch.Tensor, torch.Tensor]], target: float,
                  width: int) -> dict[int, frozenset[int]]:
    """One skip set per group id (every answer position carries one): greedily add the
    layer that keeps the most of the group's tokens (ties: least summed KL) while the
    group's agreement stays >= ``target``. Candidates: layers whose skip alone breaks no
    more of the group's tokens than the target allows, tried ``width`` at a time (0: all)
    in order of the KL measured so far; one that failed the target is not tried again."""
    L = bench.L
    ids = sorted({int(g) for gr in groups for g in gr.tolist()})
    size = {g: sum(int((gr == g).sum()) for gr in groups) for g in ids}
    fails = {g: torch.zeros(L) for g in ids}
    applies = {g: torch.zeros(L) for g in ids}  # tokens of g whose path contains layer j
    kl_alone = {g: torch.zeros(L) for g in ids}
    for gr, ex, (ok1, kl1) in zip(groups, exits, singles):
        for g in ids:
            m = gr == g
            if m.any():
                below = torch.arange(L)[None, :] < ex[m][:, None]
                fails[g] += (below & ~ok1[m]).sum(0).float()
                applies[g] += below.sum(0).float()
                kl_alone[g] += torch.where(below & ok1[m], kl1[m], torch.zeros(())).sum(0)
    score = {g: {j: float(kl_alone[g][j]) for j in range(L)
                 if applies[g][j] > 0 and fails[g][j] <= (1 - target) * size[g] + 1e-9} for g in ids}
    cur: dict[int, set[int]] = {g: set() for g in ids}
    ok_now = [torch.ones(len(gr), dtype=torch.bool) for gr in groups]
    agree_now = {g: size[g] for g in ids}
    active = {g for g in ids if score[g]}
    while active:
        tried = {g: (sorted(score[g], key=score[g].get)[:width] if width else list(score[g])) for g in active}
        gain: dict[tuple[int, int], list[float]] = {(g, j): [0.0, 0.0] for g in active for j in tried[g]}
        results: dict[tuple[int, int], list[tuple[int, int, bool]]] = {}
        for c, (ctx, gr, ex, kd) in enumerate(zip(ctxs, groups, exits, kinds)):
            rows, sets, tags = [], [], []
            for i, g in enumerate(gr.tolist()):
                if g in active:
                    for j in tried[g]:
                        if j < int(ex[i]):
                            rows.append(i)
                            sets.append(cur[g] | {j})
                            tags.append((g, j))
            if not rows:
                continue
            idx = torch.tensor(rows)
            o, k = bench.query(ctx, idx, bench.masks(sets), ex[idx], [kd[i] for i in rows])
            for r, key in enumerate(tags):
                gain[key][0] += float(o[r]) - float(ok_now[c][rows[r]])
                gain[key][1] += float(k[r])
                results.setdefault(key, []).append((c, rows[r], bool(o[r])))
        for g in list(active):
            best = None
            for j in tried[g]:
                agree, klsum = agree_now[g] + gain[(g, j)][0], gain[(g, j)][1]
                if agree / size[g] >= target - 1e-9:
                    score[g][j] = klsum
                    if best is None or (-agree, klsum) < best[0]:
                        best = ((-agree, klsum), j)
                else:
                    del score[g][j]
            if best is not None:
                j = best[1]
                cur[g].add(j)
                del score[g][j]
                agree_now[g] = -best[0][0]
                for c, i, o in results.get((g, j), []):
                    ok_now[c][i] = o
            if not score[g]:
                active.discard(g)
    return {g: frozenset(s) for g, s in cur.items()}


def kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 25) -> torch.Tensor:
    """Spherical k-means on L2-normalised rows; returns centroids [k, d]."""
    g = torch.Generator().manual_seed(seed)
    k = min(k, len(x))
    cent = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iters):
        assign = (x @ cent.T).argmax(1)
        for c in range(k):
            m = assign == c
            if m.any():
                cent[c] = F.normalize(x[m].mean(0), dim=0)
    return cent


# -- evaluation of a path per token ------------------------------------------------------
def evaluate(bench: Bench, ctx: Ctx, exit_layer: torch.Tensor, kind: list[str],
             sets: list[frozenset[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ok [n], layers run [n]) of the given per-token paths (exit, skip set below it)."""
    L = bench.L
    sets = [frozenset(j for j in s if j < int(e)) for s, e in zip(sets, exit_layer.tolist())]
    layers = exit_layer.float() - torch.tensor([len(s) for s in sets], dtype=torch.float)
    ok = torch.ones(ctx.n, dtype=torch.bool)
    plain: dict[tuple[int, str], list[int]] = {}  # exits without skips: read the stored states
    for i in range(ctx.n):
        if not sets[i] and kind[i] != FINAL:
            plain.setdefault((int(exit_layer[i]), kind[i]), []).append(i)
    for (layer, k), rows in plain.items():
        idx = torch.tensor(rows)
        top = bench.reference(ctx, layer, k, idx).argmax(-1)
        ok[idx] = (bench.heads.shortlist[top] if k == "head" else top) == ctx.target[idx]
    need = [i for i in range(ctx.n) if sets[i]]
    if need:
        idx = torch.tensor(need)
        o, _ = bench.query(ctx, idx, bench.masks([sets[i] for i in need]), exit_layer[idx], [kind[i] for i in need])
        ok[idx] = o
    return ok, layers / L


def draft_windows(exit_layer: torch.Tensor, window: int) -> torch.Tensor:
    """Window id per token: a new window after ``window`` tokens, or where a token's exit
    lies deeper than the shallowest exit of its window so far (the drafter's ceiling)."""
    ids, w, count, ceiling = [], 0, 0, None
    for e in exit_layer.tolist():
        if (window > 0 and count == window) or (ceiling is not None and e > ceiling):
            w, count, ceiling = w + 1, 0, None
        ids.append(w)
        count += 1
        ceiling = e if ceiling is None else min(ceiling, e)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def evaluate_windows(bench: Bench, ctx: Ctx, exit_layer: torch.Tensor, kind: list[str],
                     sets: list[frozenset[int]], window: int) -> torch.Tensor:
    """ok [n] when the answer is drafted in windows of up to ``window`` tokens (0: no
    limit) after a verified prefix: inside a window every token takes its path and later
    tokens attend to earlier ones' keys/values, propagated from the state that reached a
    skipped layer, absent from the exit up (see :meth:`Bench._query`). As in the drafter,
    a token that needs a deeper exit than one before it in the window starts a new one."""
    sets = [frozenset(j for j in s if j < int(e)) for s, e in zip(sets, exit_layer.tolist())]
    if all(not s for s in sets) and all(k == FINAL for k in kind):
        return torch.ones(ctx.n, dtype=torch.bool)
    offset = torch.arange(ctx.n)
    win = draft_windows(exit_layer, window)
    oks = []
    per_call = max(1, bench.batch_rows // max(window, 1)) * window if window > 0 else ctx.n
    for start in range(0, ctx.n, per_call):
        idx = offset[start:start + per_call]
        ok, _ = bench._query(ctx, idx, bench.masks([sets[i] for i in idx.tolist()]), exit_layer[idx],
                             [kind[i] for i in idx.tolist()], window=win[idx])
        oks.append(ok)
    return torch.cat(oks)


@torch.no_grad()
def sanity(bench: Bench, ctx: Ctx) -> str:
    """The bench's per-token skipping against the library: batched queries without skips
    give the full model's tokens; a query with a skip set equals a decode step under
    ``FixedPlan(skip=...)``; a whole-sequence forward with the same set for every token
    equals the wrapped model's forward under that plan."""
    model, handle, L = bench.model, bench.handle, bench.L
    ok, kl = bench.query(ctx, torch.arange(ctx.n), torch.zeros(ctx.n, L, dtype=torch.bool),
                         torch.full((ctx.n,), L), [FINAL] * ctx.n)
    gen_match = float((ctx.target == ctx.ids[0, ctx.pos + 1]).float().mean())
    ok_w, kl_w = bench._query(ctx, torch.arange(ctx.n), torch.zeros(ctx.n, L, dtype=torch.bool),
                              torch.full((ctx.n,), L), [FINAL] * ctx.n, window=torch.zeros(ctx.n, dtype=torch.long))
    check = frozenset({3, 11, 20})
    p = int(ctx.pos[ctx.n // 2])
    with handle.disabled():
        pre = model(input_ids=ctx.ids[:, :p], use_cache=True).cache
    handle.set_policy(shortcut.FixedPlan(skip=check))
    try:
        step = model(input_ids=ctx.ids[:, p:p + 1], cache=pre, use_cache=True).logits[0, -1]
        whole = model(input_ids=ctx.ids, use_cache=False).logits[0]
    finally:
        handle.set_policy(None)
    C = ctx.ids.shape[1] - 1
    att = torch.zeros(1, 1, 1, C + 1, dtype=torch.bool)
    att[0, 0, 0, :p] = True
    att[0, 0, 0, C] = True
    bench.skips.mask = bench.masks([check])
    try:
        with handle.disabled():
            mine = model(input_ids=ctx.ids[:, p:p + 1], position_ids=torch.tensor([[p]]), attention_mask=att,
                         cache=ctx.cache, use_cache=True).logits[0, -1]
        bench.skips.mask = bench.masks([check] * ctx.ids.shape[1])
        with handle.disabled():
            mine_whole = model(input_ids=ctx.ids, use_cache=False).logits[0]
    finally:
        bench.skips.mask = None
        _crop(ctx.cache, C)
    return (f"check: batched queries without skips give the full forward's top-1 at {100 * float(ok.float().mean()):.1f}% "
            f"of positions (max KL {float(kl.max()):.1e}), as one causal window {100 * float(ok_w.float().mean()):.1f}% "
            f"(max KL {float(kl_w.max()):.1e}); teacher-forced top-1 = generated token at "
            f"{100 * gen_match:.1f}%; per-token skip {sorted(check)} vs FixedPlan decode step: max |logit diff| "
            f"{float((step - mine).abs().max()):.1e}, same top-1 {bool(step.argmax() == mine.argmax())}; whole sequence "
            f"vs FixedPlan forward: max |logit diff| {float((whole - mine_whole).abs().max()):.1e}")


@torch.no_grad()
def check_with_library(bench: Bench, ctxs: list[Ctx], skip_sets: list[list[frozenset[int]]], count: int = 12) -> str:
    """Replay the largest oracle skip sets through the library: a decode step of the
    wrapped model under ``FixedPlan(skip=set)`` after the full-path prefix."""
    rows = sorted(((len(s), c, i) for c, ss in enumerate(skip_sets) for i, s in enumerate(ss)), reverse=True)[:count]
    model, handle = bench.model, bench.handle
    same = 0
    for _, c, i in rows:
        ctx = ctxs[c]
        p = int(ctx.pos[i])
        with handle.disabled():
            cache = model(input_ids=ctx.ids[:, :p], use_cache=True).cache
        handle.set_policy(shortcut.FixedPlan(skip=skip_sets[c][i]))
        try:
            logits = model(input_ids=ctx.ids[:, p:p + 1], cache=cache, use_cache=True).logits[0, -1]
        finally:
            handle.set_policy(None)
        same += int(logits.argmax()) == int(ctx.target[i])
    return (f"library replay of the {len(rows)} largest oracle skip sets ({rows[-1][0]}-{rows[0][0]} layers) as "
            f"FixedPlan decode steps: {same} of {len(rows)} give the full model's token")


# -- data ----------------------------------------------------------------------------------
@torch.no_grad()
def continuations(model, handle, tokenizer, records, new_tokens: int, cache_dir: Path) -> list[tuple[torch.Tensor, int]]:
    """(prompt + greedy answer ids [T], prompt length) per record, plain model, cached."""
    out = []
    for record in records:
        ids = prompt_input_ids(tokenizer, record)
        key = hashlib.sha256(json.dumps([handle.fingerprint["weights_sha256"], ids.tolist(), new_tokens]).encode()).hexdigest()[:20]
        path = cache_dir / f"{key}.pt"
        if path.exists():
            seq = torch.load(path)
        else:
            with handle.disabled():
                seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     do_sample=False)[0]
            cache_dir.mkdir(parents=True, exist_ok=True)
            torch.save(seq, path)
        out.append((seq, ids.shape[1]))
    return out


# -- timing ------------------------------------------------------------------------------------
@torch.no_grad()
def time_steps(model, handle, seq: torch.Tensor, plans: dict[str, Any], repeats: int) -> dict[str, dict]:
    """Median wall time of one single-token decode step (decoder layers only, no
    unembedding) under each plan, the plans run back to back in rotating order."""
    base = getattr(model, model.base_model_prefix)
    ids = seq.view(1, -1)
    C = ids.shape[1] - 1
    with handle.disabled():
        cache = model(input_ids=ids[:, :C], use_cache=True).cache
    token, position = ids[:, C:], torch.tensor([[C]])
    names = list(plans)
    times = {n: [] for n in names}
    counts = {}
    stats = handle.stats.total
    for r in range(repeats + 3):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            handle.set_policy(plans[name])
            before = (stats.layers_run, stats.kv_projections)
            try:
                start = time.perf_counter()
                base(input_ids=token, position_ids=position, cache=cache, use_cache=True)
                elapsed = time.perf_counter() - start
            finally:
                handle.set_policy(None)
                _crop(cache, C)
            if r >= 3:
                times[name].append(elapsed)
            counts[name] = (stats.layers_run - before[0], stats.kv_projections - before[1])
    return {n: {"median_ms": 1e3 * statistics.median(times[n]), "times": times[n], "layers_run": counts[n][0],
                "kv_projections": counts[n][1]} for n in names}


def paired_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


# -- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--skills", type=Path, default=Path("runs/eval/full/skills"),
                    help="skills folder with exit heads and observer (shortcut-eval practice writes it)")
    ap.add_argument("--prompts", type=int, default=8, help="practice prompts (also the size of each test set)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--target", type=float, default=1.0,
                    help="agreement a learned group set must keep on its practised tokens")
    ap.add_argument("--relaxed", type=float, default=0.9,
                    help="target of the extra, lossy global static set (the static baseline at a lower bar)")
    ap.add_argument("--clusters", type=int, default=16, help="k-means clusters of practised SAE signatures")
    ap.add_argument("--familiarity", type=float, default=0.9, help="cosine gate of signature lookups (policy default)")
    ap.add_argument("--search-width", type=int, default=4,
                    help="greedy: candidates re-measured per step, smallest KL so far first (0: all)")
    ap.add_argument("--window", type=int, default=8,
                    help="draft window of the 'draft' agreement (0: the whole answer in one window, fast-mode-like)")
    ap.add_argument("--timing-repeats", type=int, default=40)
    ap.add_argument("--batch-rows", type=int, default=256, help="queries per forward")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", type=Path, default=None, help="greedy continuations cache (default: "
                    "$SHORTCUT_CACHE/bench_answers)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    cache_dir = args.cache_dir or cache_root() / "bench_answers"

    model, tokenizer = shortcut.load_model(args.model)
    if (args.skills / "shortcut.json").is_file():
        handle = shortcut.load(model, args.skills)
    else:
        print(f"no skills folder at {args.skills}: exits are logit lens only, no signature-based rows")
        handle = shortcut.wrap(model)
    handle.set_learning(False)
    heads, observer = handle.heads, handle.observer
    bench = Bench(model, handle, heads, observer, args.batch_rows)
    L = bench.L

    practice = read_prompts(DATA / "prompts.jsonl", split="practice")[: args.prompts]
    novel = read_prompts(DATA / "prompts.jsonl", split="novel")[: args.prompts]
    near_all = {r["of"]: r for r in read_jsonl(DATA / "near_duplicates.jsonl", required=("of", "prompt"))}
    near = [dict(near_all[r["id"]], id=near_all[r["id"]].get("id", "nd-" + r["id"])) for r in practice if r["id"] in near_all]
    sets_records = {"practice": practice, "near": near, "novel": novel}
    seqs = {name: continuations(model, handle, tokenizer, recs, args.new_tokens, cache_dir)
            for name, recs in sets_records.items()}
    t_gen = time.perf_counter() - t_start

    def contexts(name):
        return [bench.context(name, r["id"], s, p) for r, (s, p) in zip(sets_records[name], seqs[name])]

    train = contexts("practice")
    n_train = sum(c.n for c in train)
    print(f"model {args.model}: {L} layers; {len(train)} practice prompts, {n_train} answer tokens; "
          f"heads {sorted(bench.head_layers) or 'none'}; observer "
          f"{'layer ' + str(observer.layer) if observer else 'none'}; setup {time.perf_counter() - t_start:.0f} s "
          f"(continuations {t_gen:.0f} s)", flush=True)

    print(sanity(bench, train[0]), flush=True)

    # -- oracles --------------------------------------------------------------------------------
    t = time.perf_counter()
    ex_lens, ex_heads, kinds = [], [], []
    for ctx in train:
        e, k = bench.exit_oracle(ctx, lens=True)
        ex_lens.append(e)
        kinds.append(k)
        ex_heads.append(bench.exit_oracle(ctx, lens=False)[0] if heads is not None else torch.full((ctx.n,), L))
    full_ex = [torch.full((c.n,), L) for c in train]
    full_k = [[FINAL] * c.n for c in train]
    singles_full, singles_exit, skip_sets, combo_sets = [], [], [], []
    for c, ctx in enumerate(train):
        s_ok, s_kl = single_matrix(bench, ctx, full_ex[c], full_k[c])
        singles_full.append((s_ok, s_kl))
        skip_sets.append(greedy_tokens(bench, ctx, full_ex[c], full_k[c], s_ok, s_kl, args.search_width))
        e_ok, e_kl = single_matrix(bench, ctx, ex_lens[c], kinds[c])
        singles_exit.append((e_ok, e_kl))
        combo_sets.append(greedy_tokens(bench, ctx, ex_lens[c], kinds[c], e_ok, e_kl, args.search_width))
        print(f"  oracle {ctx.pid}: {ctx.n} tokens, exit {float(ex_lens[c].float().mean()):.1f}, "
              f"skip {statistics.mean(len(s) for s in skip_sets[-1]):.1f}, exit+skip "
              f"{float(ex_lens[c].float().mean()) - statistics.mean(len(s) for s in combo_sets[-1]):.1f} layers "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    t_oracle = time.perf_counter() - t
    library_check = check_with_library(bench, train, skip_sets)
    print(library_check, flush=True)

    def cat(xs):
        return torch.cat([x.float() for x in xs])

    all_single = torch.cat([ok for ok, _ in singles_full])
    single_agree = all_single.float().mean(0)
    best_single = int(single_agree.argmax())

    # -- learned group sets ---------------------------------------------------------------------
    t = time.perf_counter()
    grp_global = [torch.zeros(c.n, dtype=torch.long) for c in train]
    grp_prompt = [torch.full((c.n,), k, dtype=torch.long) for k, c in enumerate(train)]
    learned: dict[str, dict[int, frozenset[int]]] = {}
    learned["global"] = greedy_groups(bench, train, grp_global, full_ex, full_k, singles_full, args.target, args.search_width)
    learned["global_relaxed"] = greedy_groups(bench, train, grp_global, full_ex, full_k, singles_full, args.relaxed,
                                              args.search_width)
    learned["global_exit"] = greedy_groups(bench, train, grp_global, ex_lens, kinds, singles_exit, args.target, args.search_width)
    learned["prompt"] = greedy_groups(bench, train, grp_prompt, full_ex, full_k, singles_full, args.target, args.search_width)
    learned["prompt_exit"] = greedy_groups(bench, train, grp_prompt, ex_lens, kinds, singles_exit, args.target, args.search_width)
    centroids = None
    if observer is not None:
        train_sig = torch.cat([c.sig for c in train])
        centroids = kmeans(train_sig, args.clusters, args.seed)
        grp_cluster = [(c.sig @ centroids.T).argmax(1) for c in train]
        learned["cluster"] = greedy_groups(bench, train, grp_cluster, full_ex, full_k, singles_full, args.target, args.search_width)
        learned["cluster_exit"] = greedy_groups(bench, train, grp_cluster, ex_lens, kinds, singles_exit, args.target, args.search_width)
    t_learn = time.perf_counter() - t
    print(f"learned group sets in {t_learn:.0f} s: global {sorted(learned['global'][0])} (at {args.relaxed}: "
          f"{sorted(learned['global_relaxed'][0])}), global inside exits "
          f"{sorted(learned['global_exit'][0])}; per prompt sizes {[len(s) for s in learned['prompt'].values()]}, "
          f"inside exits {[len(s) for s in learned['prompt_exit'].values()]}"
          + (f"; per cluster sizes {[len(s) for s in learned['cluster'].values()]}, inside exits "
             f"{[len(s) for s in learned['cluster_exit'].values()]}" if "cluster" in learned else ""), flush=True)

    # memory of practised tokens: signature -> (exit, kind, skip set, exit+skip set)
    mem_exit = torch.cat(ex_lens)
    mem_kind = [k for ks in kinds for k in ks]
    mem_skip = [s for ss in skip_sets for s in ss]
    mem_combo = [s for ss in combo_sets for s in ss]

    # -- evaluation on test sets ----------------------------------------------------------------
    t = time.perf_counter()
    relaxed = f"skip: global set at {100 * args.relaxed:.0f}%"
    methods = ["full model", "exit (per-token memory)", "skip: global static set", relaxed, "skip: per-prompt set",
               "skip: per-cluster set", "skip: per-token memory", "exit + global skip set", "exit + per-prompt skip set",
               "exit + per-cluster skip set", "exit + per-token skip memory"]
    table: dict[str, dict[str, dict[str, float]]] = {m: {} for m in methods}
    test_sets = {"exact": "practice", "near": "near", "novel": "novel"}
    for col, src in test_sets.items():
        ctxs = contexts(src)
        agg: dict[str, list] = {m: [[], [], [], []] for m in methods}  # ok, layers, shortcut-taken, ok in sequence
        for ctx in ctxs:
            n = ctx.n
            fullL = torch.full((n,), L)
            fk = [FINAL] * n
            if observer is not None:
                sim = ctx.sig @ train_sig.T
                best_sim, nearest = sim.max(1)
                familiar = best_sim >= args.familiarity - 1e-6
                prompt_k = int((torch.stack([c.prompt_sig for c in train]) @ ctx.prompt_sig).argmax())
                cluster = (ctx.sig @ centroids.T).argmax(1)
            else:
                familiar = torch.ones(n, dtype=torch.bool) if col == "exact" else torch.zeros(n, dtype=torch.bool)
                nearest = None
                prompt_k = next((k for k, c in enumerate(train) if c.pid == ctx.pid or "nd-" + c.pid == ctx.pid), None)
                cluster = None
            if col == "exact" and nearest is None:
                offset = sum(c.n for c in train[: [c.pid for c in train].index(ctx.pid)])
                nearest = torch.arange(n) + offset
            empty = [frozenset()] * n

            def gated(values, default, familiar=familiar, nearest=nearest):
                return [v if bool(familiar[i]) and nearest is not None else default for i, v in enumerate(values)]

            if nearest is not None:
                m_exit = torch.where(familiar, mem_exit[nearest], fullL)
                m_kind = [mem_kind[int(nearest[i])] if bool(familiar[i]) else FINAL for i in range(n)]
                m_skip = gated([mem_skip[int(j)] for j in nearest], frozenset())
                m_combo = gated([mem_combo[int(j)] for j in nearest], frozenset())
            else:
                m_exit, m_kind, m_skip, m_combo = fullL, fk, empty, empty
            p_full = learned["prompt"].get(prompt_k, frozenset()) if prompt_k is not None else frozenset()
            p_exit = learned["prompt_exit"].get(prompt_k, frozenset()) if prompt_k is not None else frozenset()
            paths = {
                "full model": (fullL, fk, empty),
                "exit (per-token memory)": (m_exit, m_kind, empty),
                "skip: global static set": (fullL, fk, [learned["global"][0]] * n),
                relaxed: (fullL, fk, [learned["global_relaxed"][0]] * n),
                "skip: per-prompt set": (fullL, fk, gated([p_full] * n, frozenset())),
                "skip: per-token memory": (fullL, fk, m_skip),
                "exit + global skip set": (m_exit, m_kind, gated([learned["global_exit"][0]] * n, frozenset())),
                "exit + per-prompt skip set": (m_exit, m_kind, gated([p_exit] * n, frozenset())),
                "exit + per-token skip memory": (m_exit, m_kind, m_combo),
            }
            if cluster is not None:
                paths["skip: per-cluster set"] = (fullL, fk, gated([learned["cluster"].get(int(g), frozenset())
                                                                    for g in cluster], frozenset()))
                paths["exit + per-cluster skip set"] = (m_exit, m_kind, gated(
                    [learned["cluster_exit"].get(int(g), frozenset()) for g in cluster], frozenset()))
            for name, (ex, kd, ss) in paths.items():
                ok, layers = evaluate(bench, ctx, ex, kd, ss)
                agg[name][0].append(ok.float())
                agg[name][1].append(layers)
                agg[name][2].append((layers < 1.0 - 1e-9).float())
                agg[name][3].append(evaluate_windows(bench, ctx, ex, kd, ss, args.window).float())
        for name in methods:
            if agg[name][0]:
                table[name][col] = {"layers": float(cat(agg[name][1]).mean()), "agree": float(cat(agg[name][0]).mean()),
                                    "agree_draft": float(cat(agg[name][3]).mean()),
                                    "shortcut": float(cat(agg[name][2]).mean()), "tokens": int(cat(agg[name][0]).numel())}
        if col == "exact":
            # determinism: the repeat's states equal round 1's bit for bit
            same = all(torch.equal(a.states[L], b.states[L]) and torch.equal(a.target, b.target)
                       for a, b in zip(train, ctxs))
        print(f"  evaluated {col} ({len(ctxs)} prompts) at {time.perf_counter() - t:.0f} s", flush=True)
    t_eval = time.perf_counter() - t

    # Skips inside the exits mostly lie below the signature layer: the policy would pick
    # them before it sees the token's signature, and they change that signature. How far?
    sig_after = None
    if observer is not None:
        cut = observer.layer + 1
        cos_own, familiar_after, n_rows = [], [], 0
        offset = 0
        for ctx in train:
            rows = [i for i in range(ctx.n) if any(j < cut for j in mem_combo[offset + i])]
            if rows:
                idx = torch.tensor(rows)
                sets_below = [frozenset(j for j in mem_combo[offset + i] if j < cut) for i in rows]
                bench._query(ctx, idx, bench.masks(sets_below), torch.full((len(rows),), cut), ["lens"] * len(rows))
                sig = bench.dense(observer.encode(bench.last_states[cut]))
                cos_own.append((sig * ctx.sig[idx]).sum(1))
                familiar_after.append((sig @ train_sig.T).max(1).values >= args.familiarity - 1e-6)
                n_rows += len(rows)
            offset += ctx.n
        if n_rows:
            sig_after = {"tokens": n_rows, "share": n_rows / n_train, "cos_own": float(cat(cos_own).mean()),
                         "cos_own_min": float(cat(cos_own).min()), "familiar": float(cat(familiar_after).mean())}

    # -- oracle summary -------------------------------------------------------------------------
    exit_l = cat(ex_lens)
    exit_h = cat(ex_heads)
    skip_n = torch.tensor([len(s) for ss in skip_sets for s in ss], dtype=torch.float)
    combo_n = torch.tensor([len(s) for ss in combo_sets for s in ss], dtype=torch.float)
    obs_cut = observer.layer + 1 if observer is not None else 0
    combo_below_obs = sum(len([j for j in s if j < obs_cut]) for ss in combo_sets for s in ss)
    per_prompt = lambda xs: [float(x.float().mean()) / L for x in xs]  # noqa: E731
    oracle_rows = {
        "exit oracle (lens + heads)": (exit_l / L, per_prompt(ex_lens)),
        "exit oracle (heads only)": (exit_h / L, per_prompt(ex_heads)),
        "skip oracle (full depth)": ((L - skip_n) / L, [1 - statistics.mean(len(s) for s in ss) / L for ss in skip_sets]),
        "exit + skip oracle": ((exit_l - combo_n) / L,
                               [float((e.float() - torch.tensor([len(s) for s in ss], dtype=torch.float)).mean()) / L
                                for e, ss in zip(ex_lens, combo_sets)]),
    }

    # same situation elsewhere: practised tokens of different prompts with similar signatures
    pairs_info = None
    if observer is not None:
        owner = torch.cat([torch.full((c.n,), k) for k, c in enumerate(train)])
        sim = train_sig @ train_sig.T
        close = (sim >= args.familiarity) & (owner[:, None] != owner[None, :])
        ii, jj = close.triu(1).nonzero(as_tuple=True)
        g = torch.Generator().manual_seed(args.seed)
        ri = torch.randint(0, n_train, (2000,), generator=g)
        rj = torch.randint(0, n_train, (2000,), generator=g)
        keep = owner[ri] != owner[rj]
        ri, rj = ri[keep], rj[keep]

        def jacc(a, b):
            u = a | b
            return len(a & b) / len(u) if u else 1.0

        def pair_stats(a_idx, b_idx):
            if len(a_idx) == 0:
                return None
            a_idx, b_idx = a_idx.tolist(), b_idx.tolist()
            return {"pairs": len(a_idx),
                    "same_exit": statistics.mean(float(mem_exit[a] == mem_exit[b]) for a, b in zip(a_idx, b_idx)),
                    "jaccard_skip": statistics.mean(jacc(mem_skip[a], mem_skip[b]) for a, b in zip(a_idx, b_idx)),
                    "jaccard_combo": statistics.mean(jacc(mem_combo[a], mem_combo[b]) for a, b in zip(a_idx, b_idx)),
                    "size_skip_diff": statistics.mean(abs(len(mem_skip[a]) - len(mem_skip[b])) for a, b in zip(a_idx, b_idx))}

        pairs_info = {"similar": pair_stats(ii, jj), "random": pair_stats(ri, rj)}

    # -- timing: skip set vs exit of the same layer count -------------------------------------------
    t = time.perf_counter()
    bench.skips.remove()  # time the library's own skipping, without the bench's hooks
    freq = torch.zeros(L)
    for s in mem_skip:
        for j in s:
            freq[j] += 1
    n_skip = max(1, round(float(skip_n.mean())))
    timing = {}
    for s in sorted({n_skip, L - 7}):
        skip_layers = frozenset(freq.argsort(descending=True, stable=True)[:s].tolist())
        k = L - s
        plans = {"full": None}
        for prop in (False, True):
            tag = "kv" if prop else "no-kv"
            plans[f"exit after {k} ({tag})"] = shortcut.FixedPlan(exit_after=k - 1, propagate_kv=prop)
            plans[f"skip {s} ({tag})"] = shortcut.FixedPlan(skip=skip_layers, propagate_kv=prop)
        res = time_steps(model, handle, seqs["practice"][0][0], plans, args.timing_repeats)
        timing[s] = {"skip_layers": sorted(skip_layers), "layers_run": k, "plans": res,
                     "ratio_no_kv": paired_ratio(res[f"skip {s} (no-kv)"]["times"], res[f"exit after {k} (no-kv)"]["times"]),
                     "ratio_kv": paired_ratio(res[f"skip {s} (kv)"]["times"], res[f"exit after {k} (kv)"]["times"])}
    t_time = time.perf_counter() - t

    # -- report -------------------------------------------------------------------------------------
    print()
    print(f"model={args.model} ({L} layers) greedy new_tokens={args.new_tokens} practice prompts={len(train)} "
          f"({n_train} tokens) target={args.target} familiarity={args.familiarity} clusters={args.clusters} "
          f"threads={torch.get_num_threads()}")
    print()
    print("Oracles on the practised answers (per token; exact repeats are bit-identical, so these hold on every repeat)")
    print(f"{'oracle':<30}{'layers/full':>12}{'per-prompt min..max':>22}")
    for name, (vals, pp) in oracle_rows.items():
        print(f"{name:<30}{float(vals.mean()):>12.3f}{min(pp):>13.3f} .. {max(pp):.3f}")
    saving_exit = 1 - float((exit_l / L).mean())
    saving_combo = 1 - float(((exit_l - combo_n) / L).mean())
    print(f"saving of exit + skip oracle: {saving_combo:.3f} of the full compute, of which exits "
          f"{saving_exit:.3f} ({100 * saving_exit / saving_combo if saving_combo else 0:.0f}%) and skips "
          f"{saving_combo - saving_exit:.3f} ({100 * (saving_combo - saving_exit) / saving_combo if saving_combo else 0:.0f}%)"
          + (f"; {combo_below_obs} of {int(combo_n.sum())} skipped layers inside exits lie below the signature layer "
             f"{obs_cut} (the policy decides there)" if observer is not None else ""))
    print(f"skip oracle at full depth: {float(skip_n.mean()):.2f} layers skipped per token (median "
          f"{float(skip_n.median()):.0f}, {100 * float((skip_n == 0).float().mean()):.0f}% of tokens skip none); "
          f"a single skipped layer keeps the token at {100 * float(all_single.any(1).float().mean()):.0f}% of tokens "
          f"for some layer; best single layer for all tokens: {best_single} ({100 * float(single_agree[best_single]):.1f}% "
          f"agreement); per-layer single-skip agreement "
          + " ".join(f"{j}:{100 * float(a):.0f}" for j, a in enumerate(single_agree)))
    if pairs_info and pairs_info["similar"]:
        s, r = pairs_info["similar"], pairs_info["random"]
        print(f"same situation in another prompt (signature cosine >= {args.familiarity}, {s['pairs']} pairs) vs random "
              f"pairs: same exit {100 * s['same_exit']:.0f}% vs {100 * r['same_exit']:.0f}%; Jaccard of skip sets "
              f"{s['jaccard_skip']:.2f} vs {r['jaccard_skip']:.2f} (inside exits {s['jaccard_combo']:.2f} vs "
              f"{r['jaccard_combo']:.2f}); |size difference| {s['size_skip_diff']:.1f} vs {r['size_skip_diff']:.1f}")
    if sig_after:
        print(f"signature after the memorised exit+skip sets' layers below {observer.layer + 1} ({sig_after['tokens']} "
              f"tokens, {100 * sig_after['share']:.0f}%): cosine to the token's own practised signature mean "
              f"{sig_after['cos_own']:.3f} (min {sig_after['cos_own_min']:.3f}); {100 * sig_after['familiar']:.0f}% "
              f"still pass the familiarity gate {args.familiarity}")
    print(f"repeat determinism: states and tokens of the exact repeats equal round 1 bit for bit: {same}")
    print()
    print("Learned on the practice prompts, reused. Per test set: layers run per token / full; agreement with the "
          f"full model's token, each token alone after a verified prefix (iso) / drafted in windows of {args.window or 'all'} "
          "tokens (draft); "
          "share of tokens on a shortened path")
    print(f"{'method':<30}" + "".join(f"{'| ' + c + ': layers':>18}{'iso / draft':>16}{'short':>7}" for c in test_sets))
    for name in methods:
        row = table[name]
        if not row:
            continue
        print(f"{name:<30}" + "".join(
            f"{row[c]['layers']:>18.3f}{100 * row[c]['agree']:>9.1f} /{100 * row[c]['agree_draft']:>5.1f}"
            f"{100 * row[c]['shortcut']:>6.0f}%" if c in row else f"{'-':>18}{'-':>16}{'-':>7}" for c in test_sets))
    ex_only = table["exit (per-token memory)"].get("exact", {}).get("layers")
    best_combo = min((table[m]["exact"]["layers"], m) for m in methods if m.startswith("exit +") and "exact" in table[m])
    if ex_only is not None:
        print(f"beyond the exits on exact repeats: best learned exit + skip ({best_combo[1]}) runs {best_combo[0]:.3f} "
              f"vs {ex_only:.3f} for the exits alone: skips save {ex_only - best_combo[0]:.3f} of the full compute "
              f"({100 * (ex_only - best_combo[0]) / ex_only if ex_only else 0:.1f}% of the exit path)")
    print()
    print("One decode step (batch 1, 1 token, decoder layers only, median ms; kv = keys/values propagated into the "
          "layers not run, no-kv = drafting, cache cropped)")
    for s, info in timing.items():
        res = info["plans"]
        print(f"skip {s} layers {info['skip_layers']} vs exit after {info['layers_run']} layers: "
              + ", ".join(f"{n} {r['median_ms']:.2f} ms ({r['layers_run']} layers, {r['kv_projections']} kv)"
                          for n, r in res.items())
              + f"; paired skip/exit: no-kv {info['ratio_no_kv']:.3f}, kv {info['ratio_kv']:.3f}")
    for info in timing.values():
        res, k = info["plans"], info["layers_run"]
        layer_ms = (res["full"]["median_ms"] - res[f"exit after {k} (no-kv)"]["median_ms"]) / (L - k)
        kv_ms = (res[f"exit after {k} (kv)"]["median_ms"] - res[f"exit after {k} (no-kv)"]["median_ms"]) / (L - k)
        info["layer_ms"], info["kv_ms"] = layer_ms, kv_ms
        print(f"  {L - k} layers not run: one decoder layer {layer_ms:.2f} ms, one propagated K/V {kv_ms:.2f} ms "
              f"({kv_ms / layer_ms:.2f} of a layer)")
    total = time.perf_counter() - t_start
    print(f"time: total {total:.0f} s (continuations {t_gen:.0f}, oracles {t_oracle:.0f}, learning {t_learn:.0f}, "
          f"evaluation {t_eval:.0f}, timing {t_time:.0f}); {bench.rows_run} query rows")

    result = {
        "args": {k: str(v) for k, v in vars(args).items()}, "num_layers": L, "practice_tokens": n_train,
        "oracles": {k: {"layers": float(v.mean()), "per_prompt": pp} for k, (v, pp) in oracle_rows.items()},
        "single_skip_agreement": single_agree.tolist(), "learned_sets": {k: {str(g): sorted(s) for g, s in v.items()}
                                                                        for k, v in learned.items()},
        "table": table, "pairs": pairs_info, "timing": {str(s): {k: v for k, v in info.items()}
                                                        for s, info in timing.items()},
        "library_check": library_check, "repeat_identical": same, "signature_after_skips": sig_after, "seconds": total,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=float) + "\n")
    handle.remove()
    return result


if __name__ == "__main__":
    main()
