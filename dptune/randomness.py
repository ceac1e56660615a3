"""The secret randomness of a DP-SGD run: which examples join a batch, the noise, the augmentation.

The guarantee holds only if an adversary cannot predict these streams. Each run
therefore starts from one :class:`SecretSeed` of 256 bits, by default read from
the operating system's CSPRNG (``secrets``); a user-fixed ``private_seed`` (for
reproducible experiments) is hashed to the same width but has only the entropy
the user gave it, and must be kept as secret as the data. Nothing here is
derived from the public ``seed`` (initialisation, data split), which an
adversary is assumed to know.

Three independent streams are derived from the secret with SHA-256 under
distinct labels:

* **sampling** — a NumPy ``Generator`` (PCG64) seeded with 128 bits;
* **noise** — a JAX PRNG key whose *whole* key data is filled from the secret
  (64 bits for JAX's default ``threefry2x32``, 128 for ``rbg``). ``jax.random.key(int)``
  would keep only the low 32 bits of a seed with x64 off, so that only 2³²
  noise streams would be possible — few enough to enumerate;
* **augmentation** — random words keyed by (secret, step, example index, copy),
  computed with the Threefry-2x32 block cipher (Salmon et al. 2011, "Parallel
  random numbers: as easy as 1, 2, 3"; the generator behind ``jax.random``,
  here vectorised in NumPy and tested equal to ``jax.random.threefry_2x32``).
  Keying by example rather than by position in the batch is what keeps the
  sensitivity argument simple: with the secret fixed, an example's augmented
  copies do not depend on which other examples were sampled, so adding or
  removing one example changes exactly one term of the clipped sum.

No JAX is imported at module level: only :meth:`SecretSeed.noise_key` needs it.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SECRET_BYTES = 32
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def threefry2x32(key: tuple[int, int], x0: np.ndarray, x1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Threefry-2x32 with 20 rounds, elementwise over counter words ``x0``, ``x1`` (uint32).

    Args:
      key: two 32-bit key words.
      x0, x1: counter words, broadcastable uint32 arrays.

    Returns:
      The two output words: a pseudorandom permutation of the counter under ``key``.
    """
    k0, k1 = np.uint32(key[0]), np.uint32(key[1])
    ks = (k0, k1, k0 ^ k1 ^ _PARITY)
    x0 = np.asarray(x0, np.uint32) + ks[0]
    x1 = np.asarray(x1, np.uint32) + ks[1]
    with np.errstate(over="ignore"):
        for block in range(5):
            for r in _ROTATIONS[block % 2]:
                x0 = x0 + x1
                x1 = (x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))
                x1 = x1 ^ x0
            x0 = x0 + ks[(block + 1) % 3]
            x1 = x1 + ks[(block + 2) % 3] + np.uint32(block + 1)
    return x0, x1


@dataclass(frozen=True)
class SecretSeed:
    """256 secret bits from which every private stream of one run is derived.

    ``fixed`` says whether the bits came from a user-given integer (reproducible,
    only as strong as that integer) rather than from the OS.
    """

    bits: bytes = field(repr=False)
    fixed: bool = False

    def __post_init__(self) -> None:
        if len(self.bits) != SECRET_BYTES:
            raise ValueError(f"a secret seed has {SECRET_BYTES} bytes, got {len(self.bits)}")

    @classmethod
    def from_os(cls) -> SecretSeed:
        """Full-entropy bits from the operating system's CSPRNG."""
        return cls(secrets.token_bytes(SECRET_BYTES))

    @classmethod
    def from_int(cls, seed: int) -> SecretSeed:
        """Bits derived from a user-fixed integer of any size (every bit of it counts)."""
        width = max(1, (int(seed).bit_length() + 8) // 8)
        return cls(_digest(b"dptune-private-seed", int(seed).to_bytes(width, "big", signed=True)), fixed=True)

    @classmethod
    def resolve(cls, seed: int | None) -> SecretSeed:
        """``from_int(seed)`` if a seed is given, else ``from_os()``."""
        return cls.from_os() if seed is None else cls.from_int(seed)

    def child(self, label: str) -> SecretSeed:
        """An independent secret for a sub-task (e.g. one trial of a study)."""
        return SecretSeed(_digest(b"child", self.bits, label.encode()), fixed=self.fixed)

    def _stream(self, label: bytes) -> bytes:
        return _digest(label, self.bits)

    def sampler(self) -> np.random.Generator:
        """The generator that draws Poisson batches (128-bit seed)."""
        return np.random.default_rng(int.from_bytes(self._stream(b"sampling")[:16], "big"))

    def batch_sampler(self, step: int) -> np.random.Generator:
        """The generator that draws step ``step``'s Poisson batch (128-bit seed, independent per step).

        One stream per step, rather than one sequential stream, makes any
        step's batch computable on its own: a loader's worker can prepare step t
        without the draws of steps < t, and a resumed run replays exactly the
        batches of the steps it repeats.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        label = b"sampling/step/" + str(int(step)).encode()
        return np.random.default_rng(int.from_bytes(self._stream(label)[:16], "big"))

    def noise_key(self) -> Any:
        """A JAX key for the Gaussian noise whose whole key data comes from the secret."""
        import jax

        width = int(np.prod(jax.random.key_data(jax.random.key(0)).shape))
        words = np.frombuffer(self._stream(b"noise")[: 4 * width], dtype=">u4").astype(np.uint32)
        return jax.random.wrap_key_data(jax.numpy.asarray(words.reshape(jax.random.key_data(jax.random.key(0)).shape)))

    def augmentation_words(self, step: int, indices: np.ndarray, copies: int) -> np.ndarray:
        """Two random uint32 words per (example, copy) of one step: shape [len(indices), copies, 2].

        Each word depends only on (secret, step, example index, copy index), not
        on the other examples of the batch.
        """
        indices = np.asarray(indices, dtype=np.uint64)
        if indices.size and int(indices.max()) * copies + copies > 2**32:
            raise ValueError("augmentation: examples × copies exceed 2³² counters per step")
        if not 0 <= step < 2**32:
            raise ValueError(f"augmentation: step {step} outside [0, 2³²)")
        key = np.frombuffer(self._stream(b"augmentation")[:8], dtype=">u4")
        counter = (indices[:, None] * np.uint64(copies) + np.arange(copies, dtype=np.uint64)[None, :])
        w0, w1 = threefry2x32((int(key[0]), int(key[1])), np.full(counter.shape, step, np.uint32),
                              counter.astype(np.uint32))
        return np.stack([w0, w1], axis=-1)


def _digest(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(4, "big"))
        h.update(p)
    return h.digest()
