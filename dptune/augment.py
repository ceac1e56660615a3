"""Augmentation multiplicity (De et al. 2022, "Unlocking High-Accuracy Differentially Private Image Classification through Scale").

Each example of a logical batch is expanded into K randomly augmented copies;
the DP step averages the K copies' gradients *before* clipping, so the example
still contributes one clipped gradient of norm ≤ C and the sensitivity — hence
the privacy accounting — is unchanged (tested in ``tests/test_augment.py``).
More copies reduce the variance of each example's gradient without spending
privacy.

The augmentations are random shifts (edge-padded translation by up to
``shift`` pixels, i.e. pad-and-crop) and optional horizontal flips (off for
digits, where a flip changes the meaning). They run on the host in numpy; the
copies of one example are consecutive rows, which the step relies on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dptune.errors import ConfigError


@dataclass(frozen=True)
class Augmentation:
    """K copies per example, each shifted by up to ``shift`` pixels and flipped with probability ½ if ``flip``."""

    multiplicity: int = 1
    shift: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if self.multiplicity < 1:
            raise ConfigError("augmentation.multiplicity", f"must be >= 1, got {self.multiplicity}")
        if self.shift < 0:
            raise ConfigError("augmentation.shift", f"must be >= 0 pixels, got {self.shift}")

    @property
    def active(self) -> bool:
        return self.multiplicity > 1 or self.shift > 0 or self.flip

    def __call__(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """[B, H, W, C] → [B·K, H, W, C]; rows i·K … i·K+K−1 are copies of example i."""
        out = np.repeat(images, self.multiplicity, axis=0)
        n, h, w, _ = out.shape
        if self.shift:
            s = self.shift
            padded = np.pad(out, ((0, 0), (s, s), (s, s), (0, 0)), mode="edge")
            dy = rng.integers(0, 2 * s + 1, n)
            dx = rng.integers(0, 2 * s + 1, n)
            rows = dy[:, None] + np.arange(h)[None, :]
            cols = dx[:, None] + np.arange(w)[None, :]
            out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
        if self.flip:
            flip = rng.random(n) < 0.5
            out[flip] = out[flip, :, ::-1]
        return out
