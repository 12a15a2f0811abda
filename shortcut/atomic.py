"""Writing a folder so that readers only ever see a complete one.

Protocol of :func:`replace_folder` for a target ``dir/name``:

1. build the new content in ``dir/.name.tmp-<id>``;
2. if ``dir/name`` exists, rename it to ``dir/.name.old``;
3. rename the temporary folder to ``dir/name``;
4. delete ``dir/.name.old``.

Each rename is atomic, so a process killed at any point leaves either the old folder
complete (at ``dir/name``, or at ``dir/.name.old`` when the kill fell between steps 2
and 3) or the new one at ``dir/name``. :func:`recover`, run before every write and by
readers of skills folders, finishes the job: it puts a complete ``.old`` back where the
folder is missing and removes leftover temporary and ``.old`` folders. One writer per
target at a time: a second writer's temporary folder would be taken for a leftover.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def _old(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.old")


def recover(folder: str | Path) -> None:
    """Repair what an interrupted :func:`replace_folder` of ``folder`` left behind."""
    folder = Path(folder)
    if not folder.parent.is_dir():
        return
    old = _old(folder)
    if old.is_dir() and not folder.exists():
        old.rename(folder)  # killed between the two renames: the old folder is complete
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True)  # killed before its removal: the new one is in place
    for leftover in folder.parent.glob(f".{folder.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def replace_folder(folder: str | os.PathLike[str], fill: Callable[[Path], None]) -> Path:
    """Create or replace ``folder`` with what ``fill(tmp)`` writes into an empty
    temporary folder beside it (see the module doc). If ``fill`` raises, nothing changes
    and the temporary folder is removed."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _old(folder)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder
