"""Small files written atomically: the text goes to `<name>.tmp` and is renamed over the target, so a run killed at
any moment leaves the old file or the new one, never half of one."""

from __future__ import annotations

from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
