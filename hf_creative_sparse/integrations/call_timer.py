"""Time spent in a patched layer's attention calls, without waiting for the GPU.

On CUDA each call is bracketed by two events recorded on the current stream and read back
only when asked (`CallTimer.seconds`) or when 512 calls are pending; reading them on the
hot path would wait for the GPU. The stream is looked up once per call (``Event.record()``
looks it up itself) and read events are recycled: at the Flux shape the timer had cost ~30
us of host time on a ~460 us call. On the CPU it is wall time.
"""

from __future__ import annotations

import time
from typing import Any

import torch


class CallTimer:
    """Accumulated seconds of timed calls: ``token = start(device)`` ... ``stop(token)``.

    Example:
        >>> timer = CallTimer()
        >>> timer.stop(timer.start(torch.device("cpu")))
        >>> timer.seconds() >= 0.0
        True
    """

    _MAX_PENDING = 512

    def __init__(self) -> None:
        self._seconds = 0.0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._pool: list[torch.cuda.Event] = []

    def start(self, device: torch.device) -> Any:
        if device.type == "cuda":
            stream = torch.cuda.current_stream(device.index if device.index is not None else torch.cuda.current_device())
            pool = self._pool
            start = pool.pop() if pool else torch.cuda.Event(enable_timing=True)
            end = pool.pop() if pool else torch.cuda.Event(enable_timing=True)
            start.record(stream)
            return (start, end, stream)
        return time.perf_counter()

    def stop(self, token: Any) -> None:
        if isinstance(token, tuple):
            start, end, stream = token
            end.record(stream)
            self._pending.append((start, end))
            if len(self._pending) > self._MAX_PENDING:
                self._drain()
        else:
            self._seconds += time.perf_counter() - token

    def add(self, seconds: float) -> None:
        """Count time measured elsewhere (a call handed to another processor)."""
        self._seconds += seconds

    def seconds(self) -> float:
        """Total seconds so far (waits for the pending CUDA events)."""
        self._drain()
        return self._seconds

    def reset(self) -> None:
        self._seconds = 0.0
        self._pending.clear()

    def _drain(self) -> None:
        for start, end in self._pending:
            end.synchronize()
            self._seconds += start.elapsed_time(end) / 1000.0
            self._pool += (start, end)  # read: free to record again
        self._pending.clear()
