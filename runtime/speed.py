"""The machine's speed now, against its speed when it was calibrated.

This VM's compute speed moves by 10-20 % within seconds and by more over minutes, with
nothing else running (docs/design.md, "This VM's speed is not constant"), so a
calibration's compute terms describe the machine as it was during the calibration's 60 s.
The probe is a fixed piece of work (two encoder layers' matrix products, fp32, on weights
drawn from a fixed seed: the same work on every machine and in every process, whatever
model is planned) whose time says how fast the machine computes at a moment.
`calibrate` runs it once per round and writes its median into the device
(`Device.reference_ms`); `run` runs it once per round of its measured runs and gives, beside
the prediction at the calibration's speed, the prediction with every compute term
stretched by the probe's median now over the reference (`costmodel.at_speed`).
Measured (2026-12-04, a synthetic six-layer query after each probe, 400 times, nothing
else running): the probe's time and the query's correlate at 0.75; over blocks of five,
the query's spread about its median went from 5.2 % to 2.9 % once divided by the probe's.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

HIDDEN, FFN, TOKENS, LAYERS = 384, 1536, 128, 2  # MiniLM's layer shape, one query
SEED = 20261204


class SpeedProbe:
    """The probe's weights, made once (a few MB); `measure()` runs it and returns its ms."""

    def __init__(self):
        g = torch.Generator().manual_seed(SEED)

        def w(*shape):
            return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

        self.x = torch.randn(TOKENS, HIDDEN, generator=g)
        self.layers = [(w(3 * HIDDEN, HIDDEN), w(HIDDEN, HIDDEN), w(FFN, HIDDEN),
                        w(HIDDEN, FFN)) for _ in range(LAYERS)]
        self.measure()  # first-call costs, discarded

    def _work(self) -> torch.Tensor:
        x = self.x
        for qkv, out, up, down in self.layers:
            q, k, v = (x @ qkv.T).split(HIDDEN, dim=1)
            attention = torch.softmax(q @ k.T / HIDDEN ** 0.5, dim=-1)
            x = x + (attention @ v) @ out.T
            x = x + torch.nn.functional.gelu(x @ up.T) @ down.T
        return x

    def measure(self) -> float:
        with torch.inference_mode():
            began = time.perf_counter()
            self._work()
            return (time.perf_counter() - began) * 1e3


def median_ms(samples: list[float]) -> float | None:
    """The probe's median over a run's or a calibration's rounds (None: no rounds)."""
    return round(statistics.median(samples), 4) if samples else None


def robust_sigma_pct(logs: list[float]) -> float:
    """A robust sigma, in %, of log ratios about their centre (1.4826 x the median
    absolute value: a few very slow runs do not inflate it as they do a root mean
    square); 0 for none."""
    return round(100 * 1.4826 * statistics.median(abs(v) for v in logs), 2) if logs else 0.0


def spread_pct(samples: list[float]) -> float:
    """The probe's own spread over its samples (robust_sigma_pct of log(sample / median))."""
    if not samples:
        return 0.0
    m = statistics.median(samples)
    return robust_sigma_pct([math.log(s / m) for s in samples])
