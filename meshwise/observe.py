"""What a run leaves behind and shows: its run directory and rank 0's progress bar.

Only rank 0 writes shared files and prints; other ranks get no-op stand-ins, so calling
code needs no ``if rank == 0`` of its own.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from typing import Any


class RunDir:
    """A run's directory: ``metrics.jsonl`` (one JSON object per line) and ``summary.json``.

    Writes happen on rank 0 only (``enabled``); the summary is written to a temporary
    name and renamed, so a reader never sees half of it.
    """

    def __init__(self, path: str, *, enabled: bool = True) -> None:
        self.path = os.path.abspath(path)
        self.enabled = enabled
        self._metrics = None
        if enabled:
            os.makedirs(self.path, exist_ok=True)
            self._metrics = open(os.path.join(self.path, "metrics.jsonl"), "a", buffering=1)

    def log(self, **record: Any) -> None:
        """Append one metrics record (a line of JSON)."""
        if self._metrics is not None:
            self._metrics.write(json.dumps(record) + "\n")

    def summary(self, **summary: Any) -> None:
        """Write ``summary.json`` atomically."""
        if not self.enabled:
            return
        final = os.path.join(self.path, "summary.json")
        with open(final + ".tmp", "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
        os.replace(final + ".tmp", final)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


def default_run_dir(name: str, root: str = "runs") -> str:
    """``runs/NAME-YYYYmmdd-HHMMSS-XXXX``: XXXX keeps two runs started in one second apart."""
    return os.path.join(root, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}")


class Progress:
    """A progress bar on stderr on rank 0 (``enabled``); silent elsewhere.

    ``write`` prints a line above the bar without breaking it.
    """

    def __init__(self, total: int | None, *, enabled: bool, desc: str = "") -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False, disable=None)
        self.enabled = enabled

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        elif self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
