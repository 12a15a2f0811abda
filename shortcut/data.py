"""Reading prompt and passage files (JSONL) and turning prompts into model inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

CORPUS = Path(__file__).resolve().parent / "corpus"
DEFAULT_PASSAGES = CORPUS / "passages.jsonl"
"""Real English prose (Wikipedia and OpenWebText passages, split ``train`` / ``heldout``)
shipped with the library: the default text for training an observer and for measuring
consolidation quality. Sources and licences: ``shortcut_eval/data/README.md``."""


class DataFileError(ValueError):
    """A data file is missing, empty or malformed; the message names file and line."""


def read_jsonl(path: str | Path, *, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Read a JSONL file of objects; each must have the ``required`` keys."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: no such file")
    records = []
    with path.open(encoding="utf-8") as handle:
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
            records.append(record)
    if not records:
        raise DataFileError(f"{path}: no records")
    return records


def read_prompts(path: str | Path, *, split: str | None = None) -> list[dict[str, Any]]:
    """Prompt records: each has ``prompt`` (text) or ``messages`` (a chat)."""
    records = read_jsonl(path)
    for number, record in enumerate(records, start=1):
        if "prompt" not in record and "messages" not in record:
            raise DataFileError(f"{path}, record {number}: needs a 'prompt' or a 'messages' key")
    if split is not None:
        records = [r for r in records if r.get("split") == split]
        if not records:
            raise DataFileError(f"{path}: no records with split={split!r}")
    return records


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
