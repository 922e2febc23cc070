"""A one-line text progress bar (no dependency), for the long steps a person waits on: calibrating a checkpoint's
layers in `moecompile convert`, and training steps in the examples.

Place in the pipeline: outside it; the CLI and examples pass `ProgressBar.update` where a pass takes a progress
callback. On a terminal the line is redrawn in place; in a log (not a terminal) it prints about ten lines in all, so
piped output stays readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    def __init__(self, total: int, desc: str, *, stream: TextIO | None = None, width: int = 24):
        self.total, self.desc, self.width = max(total, 0), desc, width
        self.stream = sys.stderr if stream is None else stream
        self.done = 0
        self.start = time.perf_counter()
        self._tty = getattr(self.stream, "isatty", lambda: False)()
        self._every = max(1, self.total // 10)
        self.last_line = ""

    def update(self, n: int = 1, **postfix) -> None:
        """Advance by n; postfix values (floats get 4 significant digits) are shown after the bar."""
        self.done = min(self.done + n, self.total) if self.total else self.done + n
        self.last_line = self._line(postfix)
        if self._tty:
            self.stream.write("\r" + self.last_line)
            if self.done >= self.total:
                self.stream.write("\n")
        elif self.done % self._every == 0 or self.done >= self.total:
            self.stream.write(self.last_line + "\n")
        self.stream.flush()

    def _line(self, postfix: dict) -> str:
        share = self.done / self.total if self.total else 1.0
        filled = int(round(share * self.width))
        elapsed = time.perf_counter() - self.start
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items())
        return (f"{self.desc} |{'#' * filled}{'.' * (self.width - filled)}| {self.done}/{self.total} "
                f"{elapsed:.0f}s {extra}").rstrip()
