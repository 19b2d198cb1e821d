"""Activation range calibration from a running histogram: max, mean of batch extremes, percentile, MSE and
entropy (KL).

One signed histogram per tensor over [-R, R]; when a batch exceeds R, R doubles and pairs of bins
merge, so memory stays fixed however many batches are seen. The exact minimum and maximum are
tracked alongside for the max calibrator, and the sums of each batch's minimum and maximum for the
mean_max calibrator (NNCF's default for per-tensor activations: the mean over calibration batches of
each batch's extremes, or of its largest |x| for a symmetric range, which an outlier in one batch moves
by 1/batches of its excess only; every batch counts alike, a short last one too, as NNCF counts the
items of its dataset).
"""

from __future__ import annotations

import math

import numpy as np
import torch

BINS = 4096  # even; resolution of 2R/4096 is far below one INT8 step for every range chosen


class HistogramCalibrator:
    def __init__(self, bins: int = BINS):
        assert bins % 4 == 0
        self.bins = bins
        self.hist: torch.Tensor | None = None
        self.radius = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.batches = 0
        self.sum_min = 0.0  # over batches: each batch's minimum, maximum and largest |x| (mean_max)
        self.sum_max = 0.0
        self.sum_absmax = 0.0

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()
        if x.numel() == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += x.numel()
        self.batches += 1
        self.sum_min += lo
        self.sum_max += hi
        self.sum_absmax += max(abs(lo), abs(hi))
        need = max(abs(lo), abs(hi), 1e-12)
        if self.hist is None:
            self.radius = need
            self.hist = torch.zeros(self.bins, dtype=torch.float64)
        while need > self.radius:
            # Double the range: adjacent bin pairs merge into the middle half of the new histogram.
            merged = self.hist.view(-1, 2).sum(1)
            self.hist = torch.zeros(self.bins, dtype=torch.float64)
            q = self.bins // 4
            self.hist[q : q + self.bins // 2] = merged
            self.radius *= 2.0
        self.hist += torch.histc(x, bins=self.bins, min=-self.radius, max=self.radius).double()

    # --- ranges -----------------------------------------------------------------------------------
    def _centers(self) -> torch.Tensor:
        width = 2 * self.radius / self.bins
        return -self.radius + width * (torch.arange(self.bins, dtype=torch.float64) + 0.5)

    def _quantile(self, q: float) -> float:
        cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
        idx = int(torch.searchsorted(cdf, torch.tensor([q], dtype=torch.float64)).clamp(max=self.bins - 1))
        return float(-self.radius + (idx + 1) * 2 * self.radius / self.bins)

    def _abs_hist(self) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.bins // 2
        folded = self.hist[half:] + self.hist[:half].flip(0)
        width = self.radius / half
        centers = width * (torch.arange(half, dtype=torch.float64) + 0.5)
        return folded, centers

    def range(self, method: str, symmetric: bool, percentile: float = 99.99, levels: int = 255) -> tuple[float, float]:
        """(lo, hi) with lo <= 0 <= hi; symmetric ranges have lo = -hi."""
        if self.hist is None:
            raise RuntimeError("calibrator saw no data")
        if method == "max":
            lo, hi = min(self.min, 0.0), max(self.max, 0.0)
        elif method == "mean_max":  # symmetric: the mean of each batch's largest |x|, as NNCF averages it
            if symmetric:
                lo, hi = -self.sum_absmax / self.batches, self.sum_absmax / self.batches
            else:
                lo, hi = min(self.sum_min / self.batches, 0.0), max(self.sum_max / self.batches, 0.0)
        elif method == "percentile":
            if symmetric:
                folded, _ = self._abs_hist()
                cdf = torch.cumsum(folded, 0) / folded.sum()
                idx = int(
                    torch.searchsorted(cdf, torch.tensor([percentile / 100], dtype=torch.float64)).clamp(
                        max=len(cdf) - 1
                    )
                )
                amax = min((idx + 1) * self.radius / (self.bins // 2), max(abs(self.min), abs(self.max)))
                lo, hi = -amax, amax
            else:
                lo = max(min(self._quantile(1 - percentile / 100), 0.0), min(self.min, 0.0))
                hi = min(max(self._quantile(percentile / 100), 0.0), max(self.max, 0.0))
        elif method == "mse":
            lo, hi = self._mse_range(symmetric, levels)
        elif method == "entropy":
            # Signed tensors spread the levels over both signs (128 bins of |x| at 8 bits, as TensorRT);
            # non-negative ones (after a ReLU) use every level on one side.
            amax = self._entropy_amax(levels // 2 + 1 if self.min < 0 else levels)
            lo, hi = max(min(self.min, 0.0), -amax), min(max(self.max, 0.0), amax)
        else:
            raise ValueError(f"unknown calibrator {method!r}")
        if symmetric:
            amax = max(abs(lo), abs(hi))
            lo, hi = -amax, amax
        if hi - lo <= 1e-12:
            hi = lo + 1e-8
        return lo, hi

    def _mse_range(self, symmetric: bool, levels: int) -> tuple[float, float]:
        """The clip range minimizing expected squared error: rounding noise inside, clipping outside."""
        if symmetric:
            counts, centers = self._abs_hist()
            top = max(abs(self.min), abs(self.max))
            best, best_amax = math.inf, top
            for frac in torch.linspace(0.05, 1.0, 200, dtype=torch.float64):
                amax = float(frac) * top
                step = 2 * amax / levels
                err = torch.where(centers <= amax, torch.full_like(centers, step * step / 12), (centers - amax) ** 2)
                total = float((counts * err).sum())
                if total < best:
                    best, best_amax = total, amax
            return -best_amax, best_amax
        centers = self._centers()
        lo0, hi0 = min(self.min, 0.0), max(self.max, 0.0)
        best, best_range = math.inf, (lo0, hi0)
        for frac in torch.linspace(0.05, 1.0, 200, dtype=torch.float64):
            lo, hi = float(frac) * lo0, float(frac) * hi0
            step = (hi - lo) / levels
            inside = (centers >= lo) & (centers <= hi)
            clip = torch.where(centers < lo, (centers - lo) ** 2, (centers - hi) ** 2)
            err = torch.where(inside, torch.full_like(centers, step * step / 12), clip)
            total = float((self.hist * err).sum())
            if total < best:
                best, best_range = total, (lo, hi)
        return best_range

    def _entropy_amax(self, quant_bins: int) -> float:
        """The |x| clip that minimizes KL(P || Q) (TensorRT's entropy calibration, Migacz 2017).

        For a candidate threshold at bin i, P is the histogram of |x| over bins [0, i) with the mass beyond
        added to the last bin (what clipping does); Q is bins [0, i) without that mass, merged into
        ``quant_bins`` equal groups and spread evenly back over each group's non-empty bins (what the
        quantized tensor can represent). Candidates run over every bin from ``quant_bins`` up; the
        threshold is the upper edge of the chosen bin.
        """
        folded, _ = self._abs_hist()
        hist = folded.numpy()
        width = self.radius / len(hist)
        top = int(np.nonzero(hist)[0].max()) + 1 if hist.any() else len(hist)
        if top <= quant_bins:
            return top * width  # fewer occupied bins than levels: nothing to gain from clipping
        total = hist.sum()
        best, best_i = math.inf, top
        for i in range(quant_bins, top + 1):
            p = hist[:i].copy()
            p[-1] += hist[i:].sum()
            filled = hist[:i] > 0
            group = (np.arange(i) * quant_bins) // i
            mass = np.bincount(group, weights=hist[:i], minlength=quant_bins)
            count = np.bincount(group, weights=filled.astype(np.float64), minlength=quant_bins)
            q = np.where(filled, mass[group] / np.maximum(count[group], 1), 0.0)
            if p[-1] > 0 and q[-1] == 0:
                continue  # P has mass where Q has none: infinite divergence
            keep = p > 0
            pn, qn = p[keep] / total, q[keep] / q.sum()
            kl = float(np.sum(pn * np.log(pn / qn)))
            if kl < best:
                best, best_i = kl, i
        return best_i * width
