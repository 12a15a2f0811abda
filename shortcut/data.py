"""Reading prompt and passage files (JSONL) and turning prompts into model inputs."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

CORPUS = Path(__file__).resolve().parent / "corpus"
DEFAULT_PASSAGES = CORPUS / "passages.jsonl"
"""Real English prose (Wikipedia and OpenWebText passages, split ``train`` / ``heldout``)
shipped with the library: the default text for training an observer and for measuring
consolidation quality. Sources and licences: ``shortcut_eval/data/README.md``."""

MAX_FILE_BYTES = 256 * 2**20
"""Largest JSONL file read: every record is held in memory (as Python objects, several
times the file's size), and no workload here needs more than a few megabytes."""

_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object"}


class DataFileError(ValueError):
    """A data file is missing, empty or malformed; the message names file and line."""


def read_jsonl(path: str | Path, *, required: tuple[str, ...] = (), types: dict[str, type] | None = None,
               check: Callable[[dict[str, Any], str], None] | None = None) -> list[dict[str, Any]]:
    """Read a JSONL file of objects; each must have the ``required`` keys, each key of
    ``types`` that a record has must hold a value of that type, and ``check(record,
    where)`` (``where`` names file and line for its message) must not raise. Files over
    :data:`MAX_FILE_BYTES` are refused."""
    path = Path(path)
    if path.is_dir():
        raise DataFileError(f"{path}: a folder, not a JSONL file")
    if not path.is_file():
        raise DataFileError(f"{path}: no such file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DataFileError(f"{path}: {size / 2**20:.0f} MiB; files over {MAX_FILE_BYTES // 2**20} MiB are refused "
                            "(split it)")
    records = []
    with path.open(encoding="utf-8") as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataFileError(f"{path}, line {number}: not valid JSON ({err.msg})") from err
                if not isinstance(record, dict):
                    raise DataFileError(f"{path}, line {number}: expected a JSON object")
                missing = [key for key in required if key not in record]
                if missing:
                    raise DataFileError(f"{path}, line {number}: missing key(s) {missing}")
                for key, kind in (types or {}).items():
                    # bool is an int subclass in Python; true/false is never a count or an index here
                    if key in record and (not isinstance(record[key], kind) or isinstance(record[key], bool)):
                        expected = _TYPE_NAMES.get(kind, kind.__name__)
                        raise DataFileError(f"{path}, line {number}: {key!r} must be {expected}, "
                                            f"got {_shorten(record[key])}")
                if check is not None:
                    check(record, f"{path}, line {number}")
                records.append(record)
        except UnicodeDecodeError as err:
            raise DataFileError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start} of a line)") from err
    if not records:
        raise DataFileError(f"{path}: no records")
    return records


def read_passages(path: str | Path) -> list[dict[str, Any]]:
    """Passage records: each has ``text`` (a string); ``split`` and ``id`` are strings when present."""
    return read_jsonl(path, required=("text",), types={"text": str, "split": str, "id": str})


def read_prompts(path: str | Path, *, split: str | None = None) -> list[dict[str, Any]]:
    """Prompt records: each has ``prompt`` (a non-empty string) or ``messages`` (a
    non-empty list of ``{"role": str, "content": str}``); ``id`` and ``split`` are
    strings when present."""
    records = read_jsonl(path, types={"split": str}, check=check_prompt)
    if split is not None:
        records = [r for r in records if r.get("split") == split]
        if not records:
            raise DataFileError(f"{path}: no records with split={split!r}")
    return records


def check_prompt(record: dict[str, Any], where: str) -> None:
    """Refuse a prompt record that :func:`prompt_input_ids` cannot turn into tokens;
    ``where`` names the record in the message."""
    if "prompt" not in record and "messages" not in record:
        raise DataFileError(f"{where}: needs a 'prompt' or a 'messages' key")
    if "prompt" in record and (not isinstance(record["prompt"], str) or not record["prompt"].strip()):
        raise DataFileError(f"{where}: 'prompt' must be a non-empty string, got {_shorten(record['prompt'])}")
    if "messages" in record:
        messages = record["messages"]
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                           for m in messages)):
            raise DataFileError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}, "
                                f"got {_shorten(messages)}")
    if "id" in record and not isinstance(record["id"], str):
        raise DataFileError(f"{where}: 'id' must be a string, got {_shorten(record['id'])}")


def _shorten(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def prompt_input_ids(tokenizer: Any, record: dict[str, Any] | str) -> torch.Tensor:
    """Token ids [1, T] for a prompt record, through the chat template when the
    tokenizer has one (instruct models), else the plain text."""
    if isinstance(record, str):
        record = {"prompt": record}
    messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return ids["input_ids"]
    text = "\n".join(m["content"] for m in messages)
    return tokenizer(text, return_tensors="pt")["input_ids"]


def context_length(model: Any, tokenizer: Any = None) -> int | None:
    """The most tokens ``model`` takes in one sequence: the smaller of its config's
    position limit (``max_position_embeddings``, or ``n_positions`` for GPT-2) and the
    tokenizer's ``model_max_length`` (unless that is transformers' "no limit" value);
    ``None`` when neither says."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    limits = [getattr(config, name, None) for name in ("max_position_embeddings", "n_positions")]
    limits.append(getattr(tokenizer, "model_max_length", None))
    # tokenizers without a known limit report int(1e30) (transformers' VERY_LARGE_INTEGER)
    known = [int(n) for n in limits if isinstance(n, int) and 0 < n < 10**9]
    return min(known) if known else None


def check_prompt_lengths(tokenizer: Any, records: Iterable[dict[str, Any] | str], *, max_new_tokens: int,
                         context: int | None, option: str = "--new-tokens", source: str = "") -> None:
    """Refuse prompts that do not leave ``max_new_tokens`` positions in the model's
    ``context``: the message names the prompt (its ``id``, else its place in
    ``records``), its token count and the most it may have. ``option`` names the
    setting of ``max_new_tokens`` in the message. No check when ``context`` is None."""
    if context is None:
        return
    room = context - max_new_tokens
    if room < 1:
        raise ValueError(f"{option} {max_new_tokens} leaves no room for a prompt in the model's context of "
                         f"{context} tokens (allowed: at most {context - 1})")
    for number, record in enumerate(records, start=1):
        tokens = int(prompt_input_ids(tokenizer, record).shape[1])
        if tokens > room:
            name = record.get("id") if isinstance(record, dict) else None
            label = f"prompt {name!r}" if name is not None else f"prompt {number}"
            raise ValueError(f"{source + ': ' if source else ''}{label} has {tokens} tokens; the model's context is "
                             f"{context} tokens, so with {option} {max_new_tokens} a prompt may have at most {room}")
