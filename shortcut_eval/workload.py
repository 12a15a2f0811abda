"""What an evaluation runs on: the wrapped model with its skills ("a system"), the prompt
sets, and one timed, counted generation per method.

Methods are measured side by side on the same prompt in the same process, in rotating
order, so every speed figure is a ratio to plain ``generate`` from one pair. Compute per
generated token (parameter bytes read, FLOPs) is counted by the runtime for everything
that runs through the model's layers (shortcut's drafts and verification, and the
peers' own forwards under :meth:`shortcut.Shortcut.reference`), relative to plain
decoding; see ``shortcut/decode/accounting.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import shortcut
from shortcut.data import DataFileError, check_prompt, prompt_input_ids, read_jsonl, read_passages, read_prompts
from shortcut.decode.accounting import ParamSizes, decode_only, plain_cost, prefill_cost, shortcut_cost, stats_delta
from shortcut.decode.stats import DecodeStats
from shortcut.models import cache_root

DATA = Path(__file__).resolve().parent / "data"
#: committed workloads of ``shortcut-eval practice --workload``: prompts (practice/novel),
#: near-duplicates or edits of practised prompts, task families (practice/transfer)
WORKLOADS = {
    "chat": (DATA / "prompts.jsonl", DATA / "near_duplicates.jsonl", DATA / "families.jsonl"),
    "code": (DATA / "code_prompts.jsonl", DATA / "code_edits.jsonl", DATA / "code_families.jsonl"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class System:
    """One wrapped model under evaluation."""

    label: str
    model: Any
    tokenizer: Any
    handle: Any
    sizes: ParamSizes
    observer_seconds: float = 0.0


@dataclass
class Method:
    """A way to generate: ``plain`` (untouched model), ``shortcut`` (the wrapped model in
    ``mode``, with ``options`` as :class:`shortcut.ShortcutConfig` fields set for the
    call, a group's fields by dotted name, e.g. ``{"lossless.shallow_drafts": False}`` for
    the memory-only ablation) or ``peer``
    (the model's own ``generate`` with ``options`` as its keyword arguments)."""

    name: str
    kind: str
    system: System
    mode: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def load_system(label: str, model_name: str, *, dtype: str, skills: str | None, seed: int,
                corpus: Path, sae_steps: int, progress: bool, observer_layer: int | None = None,
                exit_layers: list[int] | None = None) -> System:
    """Load ``model_name`` and wrap it: with the skills folder ``skills``, or fresh with
    an observer (at ``observer_layer``, default the config's; trained once on ``corpus`` and
    cached per model fingerprint and layer) and exits at ``exit_layers``."""
    model, tokenizer = shortcut.load_model(model_name, dtype=DTYPES[dtype])
    observer_seconds = 0.0
    if skills:
        handle = shortcut.load(model, skills)
        if handle.learner is None:
            raise ValueError(f"skills folder {skills} holds a config only; practise first (shortcut practice)")
    else:
        shape = {"observer_layers": [observer_layer]} if observer_layer is not None else {}
        if exit_layers:
            shape["exit_layers"] = list(exit_layers)
        learning = shortcut.LearningConfig(consolidate_every=0)
        handle = shortcut.wrap(model, shortcut.ShortcutConfig(seed=seed, learning=learning, **shape))
        observer_seconds = _default_observer(handle, tokenizer, corpus, sae_steps, progress)
    handle.set_learning(False)
    return System(label, model, tokenizer, handle, ParamSizes.of(handle), observer_seconds)


def _default_observer(handle: Any, tokenizer: Any, corpus: Path, steps: int, progress: bool) -> float:
    """Attach the model's default observer; returns the seconds spent training it (0 if
    cached). The cache key names everything the observer depends on: the model's weights,
    the layer, the corpus's bytes and the training settings."""
    from shortcut.observe import DEFAULT_D_SAE, DEFAULT_K, DEFAULT_MAX_TOKENS, load_observer, save_observer

    layer = handle.config.observer_layers[0]
    corpus_hash = hashlib.sha256(corpus.read_bytes()).hexdigest()[:8]
    key = (f"{handle.fingerprint['weights_sha256'][:12]}-L{layer}-{steps}-{corpus_hash}"
           f"-w{DEFAULT_D_SAE}-k{DEFAULT_K}-n{DEFAULT_MAX_TOKENS}")
    folder = cache_root() / "observers" / key
    width = handle.parts.unembed.weight.shape[1]
    if folder.is_dir():
        handle.attach_observer(load_observer(folder, d_model=width, n_layers=handle.num_layers,
                                             expected_fingerprint=handle.fingerprint))
        return 0.0
    records = read_passages(corpus)
    texts = [r["text"] for r in records if r.get("split", "train") == "train"] or [r["text"] for r in records]
    start = time.perf_counter()
    observer = handle.train_observer(texts, tokenizer, steps=steps, progress=progress)
    seconds = time.perf_counter() - start
    save_observer(observer.sae, folder, layer=observer.layer, fingerprint=handle.fingerprint,
                  quality=observer.quality)
    return seconds


def prompt_sets(prompts: Path, near: Path | None, *, n_practice: int, n_test: int,
                families: Path | None = None, n_family: int | None = None) -> dict[str, list[dict]]:
    """The practice stream and the test sets, each at most ``n_test`` prompts.

    ``prompts`` records carry ``split`` = ``practice`` / ``novel``; a file without splits
    is cut in two (first ``n_practice`` practised, the rest novel). Near-duplicates
    (records with ``of`` = a practised prompt's ``id``) come from ``near`` when given.
    With ``families`` (see :func:`family_sets`), the first ``n_family`` practice
    instances of each family join the practice stream and unseen instances of the same
    families form the ``transfer`` set. Exact repeats and near-duplicates stay those of
    ``prompts``. Sets come in the order practice, exact repeats, near-duplicates,
    transfer, novel (from practised verbatim to never practised).
    """
    records = read_prompts(prompts)
    if any("split" in r for r in records):
        practice = read_prompts(prompts, split="practice")
        novel = [r for r in records if r.get("split") == "novel"]
    else:
        practice, novel = records[:n_practice], records[n_practice:]
    practice = practice[:n_practice]
    for number, record in enumerate(practice, start=1):
        record.setdefault("id", f"{prompts.name}#{number}")
    sets = {"practice": practice, "exact repeats": practice[:n_test], "novel": novel[:n_test]}
    if near is not None:
        by_origin = {r["of"]: r for r in read_jsonl(near, check=_check_near_duplicate)}
        sets["near-duplicates"] = [by_origin[r["id"]] for r in practice if r["id"] in by_origin][:n_test]
        if not sets["near-duplicates"]:
            raise DataFileError(f"{near}: no record's 'of' names a practised prompt id of {prompts}")
    if not sets["novel"]:
        raise DataFileError(f"{prompts}: no novel prompts left after the {len(practice)} practised ones")
    if families is not None:
        practised, sets["transfer"] = family_sets(families, n_family=n_family, n_test=n_test)
        sets["practice"] = practice + practised
    order = ("practice", "exact repeats", "near-duplicates", "transfer", "novel")
    return {name: sets[name] for name in order if name in sets}


FAMILY_SPLITS = ("practice", "transfer")


def family_sets(path: Path, *, n_family: int | None, n_test: int) -> tuple[list[dict], list[dict]]:
    """The practised instances and the transfer set of a task-family file.

    Each record is a prompt record (``prompt`` or ``messages``) with ``family`` (a
    string naming the task) and ``split``: ``practice`` (may be practised) or
    ``transfer`` (never practised). Returns the first ``n_family`` practice records of
    each family (all with ``None``), and ``n_test`` transfer records taken from the
    families in turn (file order within a family), so every family is measured. A family
    with transfer records must have practice records: its transfer would be novel.
    """
    records = read_jsonl(path, required=("family", "split"), types={"family": str, "split": str, "id": str},
                         check=_check_family_record)
    by_family: dict[str, dict[str, list[dict]]] = {}
    for number, record in enumerate(records, start=1):
        record.setdefault("id", f"{path.name}#{number}")
        by_family.setdefault(record["family"], {s: [] for s in FAMILY_SPLITS})[record["split"]].append(record)
    unpractised = sorted(f for f, s in by_family.items() if s["transfer"] and not s["practice"])
    if unpractised:
        raise DataFileError(f"{path}: families {', '.join(unpractised)} have transfer records but no practice "
                            "records (their transfer would be novel)")
    practised = [r for s in by_family.values() for r in s["practice"][:n_family]]
    queues = [s["transfer"] for s in by_family.values() if s["transfer"]]
    if not queues:
        raise DataFileError(f"{path}: no record has split 'transfer'")
    transfer: list[dict] = []
    for index in range(max(len(q) for q in queues)):
        transfer += [q[index] for q in queues if index < len(q)]
    return practised, transfer[:n_test]


def _check_family_record(record: dict, where: str) -> None:
    check_prompt(record, where)
    if record["split"] not in FAMILY_SPLITS:
        raise DataFileError(f"{where}: 'split' must be one of {', '.join(FAMILY_SPLITS)}, got {record['split']!r}")
    if not record["family"].strip():
        raise DataFileError(f"{where}: 'family' must name the task, got an empty string")


def _check_near_duplicate(record: dict, where: str) -> None:
    check_prompt(record, where)
    if not isinstance(record.get("of"), str):
        raise DataFileError(f"{where}: 'of' must be the id (a string) of a practised prompt, got {record.get('of')!r}")


def read_choices(path: Path) -> list[dict]:
    """Multiple-choice items: ``question`` (a string), ``choices`` (two or more
    non-empty strings) and ``answer`` (the index of the right choice)."""
    return read_jsonl(path, required=("question", "choices", "answer"),
                      types={"question": str, "choices": list, "answer": int, "id": str}, check=_check_choice)


def _check_choice(item: dict, where: str) -> None:
    choices = item["choices"]
    if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise DataFileError(f"{where}: 'choices' must be a list of two or more non-empty strings")
    if not 0 <= item["answer"] < len(choices):
        raise DataFileError(f"{where}: 'answer' {item['answer']} must index into 'choices' (0..{len(choices) - 1})")


def input_ids(system: System, record: dict) -> torch.Tensor:
    """The prompt ids of ``record`` for ``system``'s tokenizer."""
    return prompt_input_ids(system.tokenizer, record)


def generate(method: Method, ids: torch.Tensor, new_tokens: int) -> dict[str, Any]:
    """One timed greedy generation with ``method``; compute counted for the decode phase."""
    system = method.system
    handle, model = system.handle, system.model
    gen = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    stats_before, decode_before = handle.stats.total.as_dict(), handle.decode_stats.copy()
    learner = handle.learner
    learn_before = learner.stats.learn_seconds if learner else 0.0
    start = time.perf_counter()
    if method.kind == "plain":
        with handle.disabled():
            out = model.generate(**gen)
    elif method.kind == "shortcut":
        # the skills keep the mode and settings they were made with
        changes = {"mode": method.mode, **method.options}
        fields, unknown = [], []
        for name, value in changes.items():
            target = _config_field(handle.config, name)
            if target is None:
                unknown.append(name)
            else:
                fields.append((*target, value))
        if unknown:
            raise ValueError(f"method {method.name!r}: {sorted(unknown)} are not ShortcutConfig fields")
        saved = [(owner, attribute, getattr(owner, attribute)) for owner, attribute, _ in fields]
        try:
            for owner, attribute, value in fields:
                setattr(owner, attribute, value)
            out = model.generate(**gen)
        finally:
            for owner, attribute, value in saved:
                setattr(owner, attribute, value)
    else:
        with handle.reference():
            out = model.generate(**gen, **method.options)
    seconds = time.perf_counter() - start
    new = int(out.shape[1] - ids.shape[1])
    if method.kind == "plain":
        cost = plain_cost(system.sizes, ids.shape[1], new)
        prefill = prefill_cost(system.sizes, ids.shape[1])
        call_cost = {k: cost[k] + prefill[k] for k in cost}
        decode = DecodeStats()
    else:
        stats = stats_delta(handle.stats.total.as_dict(), stats_before)
        decode = handle.decode_stats - decode_before
        call_cost = shortcut_cost(system.sizes, stats, decode)
        # the prefill read only the prompt positions not kept from earlier text
        prefilled = ids.shape[1] - decode.prompt_reused
        cost = decode_only(call_cost, system.sizes, prefilled)
    return {"output": out, "seconds": seconds, "new_tokens": new, "cost": cost, "call_cost": call_cost,
            "drafted": float(decode.drafted), "accepted": float(decode.accepted),
            "skip_drafted": float(decode.skip_drafted), "skip_accepted": float(decode.skip_accepted),
            # tokens from practised sequences: accepted lossless drafts, committed fast-mode answers
            "recalled": float(decode.recall_accepted + decode.recall_committed),
            "learn_seconds": (learner.stats.learn_seconds - learn_before) if learner else 0.0}


def _config_field(config: Any, name: str) -> tuple[Any, str] | None:
    """The object and attribute a method option names: a top-level field (``"mode"``)
    or a group's (``"lossless.shallow_drafts"``); ``None`` when there is no such field."""
    *groups, attribute = name.split(".")
    owner = config
    for group in groups:
        owner = getattr(owner, group, None)
        if not dataclasses.is_dataclass(owner):
            return None
    if not dataclasses.is_dataclass(owner) or attribute not in {f.name for f in dataclasses.fields(owner)}:
        return None
    return owner, attribute


@torch.no_grad()
def teacher_forced_agreement(system: System, prompt_len: int, out: torch.Tensor) -> int:
    """How many generated tokens equal the full model's greedy choice after the same prefix."""
    if out.shape[1] <= prompt_len:
        return 0
    with system.handle.disabled():
        full = system.model(input_ids=out).logits[0, prompt_len - 1:-1].argmax(-1)
    return int((full == out[0, prompt_len:]).sum())


def measure_prompt(methods: list[Method], plain: Method, record: dict, new_tokens: int, rotation: int,
                   ) -> dict[str, dict[str, Any]]:
    """Run ``plain`` and every method on one prompt in rotating order; one row per method
    with its ratios to this prompt's plain run."""
    ids = input_ids(plain.system, record)
    order = [plain, *methods]
    shift = rotation % len(order)
    order = order[shift:] + order[:shift]
    runs = {m.name: generate(m, ids, new_tokens) for m in order}
    base = runs[plain.name]
    reference = plain_cost(plain.system.sizes, ids.shape[1], base["new_tokens"])
    call_reference = base["call_cost"]["flops"]  # plain's whole call, its prefill included
    rows = {}
    for method in [plain, *methods]:
        run = runs[method.name]
        agree = (run["new_tokens"] if method.kind == "plain"
                 else teacher_forced_agreement(method.system, ids.shape[1], run["output"]))
        rows[method.name] = {
            "prompt_id": record.get("id"), "prompt_tokens": int(ids.shape[1]), "new_tokens": run["new_tokens"],
            "seconds": run["seconds"], "tokens_per_second": run["new_tokens"] / run["seconds"],
            "speed_ratio": base["seconds"] / run["seconds"],
            "bytes_rel": run["cost"]["bytes"] / reference["bytes"],
            "flops_rel": run["cost"]["flops"] / reference["flops"],
            "call_flops_rel": run["call_cost"]["flops"] / call_reference,
            "identical": bool(torch.equal(run["output"], base["output"])), "agreed_tokens": agree,
            "drafted": run["drafted"], "accepted": run["accepted"], "recalled": run["recalled"],
            "skip_drafted": run["skip_drafted"], "skip_accepted": run["skip_accepted"],
            "learn_seconds": run["learn_seconds"],
            "output_ids": run["output"][0, ids.shape[1]:].tolist(),
        }
    return rows


def summarise(rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Medians of the per-prompt ratios and totals of the counts."""
    tokens = sum(r["new_tokens"] for r in rows)
    drafted = sum(r["drafted"] for r in rows)
    summary = {
        "prompts": len(rows),
        "tokens": tokens,
        "speed_ratio": statistics.median(r["speed_ratio"] for r in rows),
        "tokens_per_second": statistics.median(r["tokens_per_second"] for r in rows),
        "bytes_rel": statistics.median(r["bytes_rel"] for r in rows),
        "flops_rel": statistics.median(r["flops_rel"] for r in rows),
        # the whole call, prefill included (kept prefixes show here, not in flops_rel)
        "call_flops_rel": statistics.median(r["call_flops_rel"] for r in rows),
        "identical": sum(r["identical"] for r in rows) / len(rows),
        "agreement": sum(r["agreed_tokens"] for r in rows) / max(tokens, 1),
        "acceptance": sum(r["accepted"] for r in rows) / drafted if drafted else None,
        "drafted_per_token": drafted / max(tokens, 1),
        # generated tokens that came from practised sequences (accepted drafts, committed answers)
        "recalled_share": sum(r.get("recalled", 0.0) for r in rows) / max(tokens, 1),
        # drafts made with layers stepped over (lossless.skip_drafts)
        "skip_drafted_per_token": sum(r.get("skip_drafted", 0.0) for r in rows) / max(tokens, 1),
        "skip_accepted_per_token": sum(r.get("skip_accepted", 0.0) for r in rows) / max(tokens, 1),
        "learn_seconds": sum(r["learn_seconds"] for r in rows),
    }
    summary.update(extra)
    return summary
