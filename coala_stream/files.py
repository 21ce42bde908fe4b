"""Output files as a user on a shared machine expects them: readable as the umask allows.

``safetensors.torch.save_file`` always creates its file with mode 0600 (whatever
the umask), so colleagues cannot read a model written through it. Every
safetensors file coala-stream writes goes through `save_safetensors`, which
sets the mode a plain ``open()`` would have given (0644 under the usual 022).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _umask() -> int:
    # os.umask can only be read by setting it; /proc tells without that race where it exists
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from ``open()`` under this process's umask."""
    return 0o666 & ~_umask()


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata or {"format": "pt"})
    os.chmod(path, file_mode())


def write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
