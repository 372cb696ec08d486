"""Per-model request counters and latency percentiles for the `stats` endpoint.

Written by the I/O thread and (a periodic model's refused observations) the scheduler thread, read by
the I/O thread, hence the lock. A metric is just a name: a new one is one more `record` keyword; a
new counter is one more `count` name. (The
scheduler keeps its own tally per model: completions, misses, tardiness; `stats` shows both.)
"""

from __future__ import annotations

import threading
from collections import Counter, deque

import numpy as np

# Stages of one request, in milliseconds (see Request in server.py for where each is stamped):
#   decode    receive -> decoded and validated          queue   waiting: earlier requests, the scheduler, other models
#   infer     the model's own work: staging, then first launch -> last segment done
#   encode    last segment done -> reply encoded        total   receive -> reply encoded
#   overhead  total - infer: the runtime's own share
METRICS = ("decode", "queue", "infer", "encode", "total", "overhead")
PERCENTILES = (50, 95, 99)


class ModelStats:
    def __init__(self, window: int):
        self._lock = threading.Lock()
        self._samples = {m: deque(maxlen=window) for m in METRICS}
        self.count = 0
        self.errors: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()  # events that are not requests, e.g. published action chunks

    def record(self, **ms: float) -> None:
        with self._lock:
            self.count += 1
            for name, value in ms.items():
                self._samples[name].append(value)

    def record_error(self, code: str) -> None:
        with self._lock:
            self.count += 1
            self.errors[code] += 1

    def count_event(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def snapshot(self) -> dict:
        with self._lock:
            samples = {m: np.fromiter(s, dtype=np.float64, count=len(s)) for m, s in self._samples.items()}
            out: dict = {"count": self.count, "errors": sum(self.errors.values()), "errors_by_code": dict(self.errors),
                         **self.counters}
        for name, values in samples.items():
            if len(values):
                p = np.percentile(values, PERCENTILES)
                out[f"{name}_ms"] = {f"p{q}": round(float(v), 4) for q, v in zip(PERCENTILES, p)}
                out[f"{name}_ms"]["n"] = len(values)
        return out
