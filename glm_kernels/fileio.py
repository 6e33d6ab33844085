"""Writing files atomically: a reader (or a run killed mid-write) sees the old file or the new one, never half."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def atomic_write(path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` fills a temporary file next to `path`, which then replaces `path` in one rename.

    If `write` raises, `path` is untouched and the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path, text: str) -> None:
    """`text` (UTF-8) into `path`, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
