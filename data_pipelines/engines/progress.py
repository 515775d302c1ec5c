"""The tqdm bar of `prepare`: files done, with documents, tokens and tokens/s; thread-safe, fed by any engine."""

from __future__ import annotations

import threading
import time


class Progress:
    def __init__(self, *, total: int, done: int, enabled: bool):
        self.enabled = enabled
        self.docs = self.tokens = 0
        self.start = time.perf_counter()
        self._lock = threading.Lock()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="file", desc="prepare", dynamic_ncols=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.close()

    def update(self, files: int, docs: int, tokens: int) -> None:
        with self._lock:
            self.docs += docs
            self.tokens += tokens
            if self.enabled:
                rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
                self.bar.set_postfix_str(f"docs={self.docs:,} tokens={self.tokens:,} tok/s={rate:,.0f}",
                                         refresh=False)
                self.bar.update(files)
