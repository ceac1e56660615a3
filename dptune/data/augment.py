"""Augmentation multiplicity (De et al. 2022, "Unlocking High-Accuracy Differentially Private Image
Classification through Scale").

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

The randomness is secret and keyed by example: the caller passes random words
that depend only on (secret, step, example, copy)
(:meth:`dptune.randomness.SecretSeed.augmentation_words`). A stream drawn from a
public seed and assigned by batch position would break the sensitivity argument:
adding one example would shift the augmentation of every later example, so two
neighbouring batches would differ in many clipped terms, not one.
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

    def __call__(self, images: np.ndarray, words: np.ndarray) -> np.ndarray:
        """[B, H, W, C] → [B·K, H, W, C]; rows i·K … i·K+K−1 are copies of example i.

        Args:
          images: B examples.
          words: uint32 random words of shape [B, K, 2]; copy k of example i is
            transformed by ``words[i, k]`` alone.

        Returns:
          The B·K augmented copies.
        """
        k = self.multiplicity
        words = np.asarray(words, np.uint32)
        if words.shape != (images.shape[0], k, 2):
            raise ValueError(f"augmentation: words of shape {(images.shape[0], k, 2)} expected, got {words.shape}")
        out = np.repeat(images, k, axis=0)
        n, h, w, _ = out.shape
        first, second = words[..., 0].reshape(n), words[..., 1].reshape(n)
        if self.shift:
            s = self.shift
            padded = np.pad(out, ((0, 0), (s, s), (s, s), (0, 0)), mode="edge")
            dy = (first & 0xFFFF) % (2 * s + 1)
            dx = (first >> 16) % (2 * s + 1)
            rows = dy[:, None] + np.arange(h)[None, :]
            cols = dx[:, None] + np.arange(w)[None, :]
            out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
        if self.flip:
            flip = (second & 1).astype(bool)
            out[flip] = out[flip, :, ::-1]
        return out
