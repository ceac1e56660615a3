"""The names callers used before the clipping engine was one package; each is defined in :mod:`dptune.trainer.clipping`.

:func:`clipped_sum` here is the engine's ``fast`` path (falling back to
``vmap``) with the per-example loss given positionally, and :func:`plan` its
abstract evaluation.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from dptune.errors import ConfigError
from dptune.trainer.clipping import engine
from dptune.trainer.clipping.engine import ClipResult, LossFn, cross_entropy
from dptune.trainer.clipping.independence import check_per_example, mixing_reason
from dptune.trainer.clipping.rules import RULE_NAMES as RULES
from dptune.trainer.clipping.rules import dense_uses_ghost, embed_pieces, embed_rows, ghost_dense_norms

PyTree = Any
PATHS: tuple[str, ...] = ("auto", "vmap")
FastClip = ClipResult

__all__ = ["PATHS", "RULES", "FastClip", "check_per_example", "clipped_sum", "cross_entropy", "dense_uses_ghost",
           "embed_pieces", "embed_rows", "ghost_dense_norms", "mixing_reason", "plan"]


def clipped_sum(model: nn.Module, params: PyTree, x: jax.Array, y: jax.Array, mask: jax.Array,
                clip_norm: jax.Array | float, loss_fn: LossFn | None = None, path: str = "auto") -> ClipResult:
    """:func:`dptune.trainer.clipping.clipped_sum` on the ``fast`` path ("auto") or the ``vmap`` reference.

    Raises:
        ConfigError: ``path`` is not one of :data:`PATHS`.
    """
    if path not in PATHS:
        raise ConfigError("clipping", f"unknown {path!r}; allowed: {', '.join(PATHS)}")
    return engine.clipped_sum(model, params, x, y, mask, clip_norm, path="fast" if path == "auto" else "vmap",
                              loss_fn=loss_fn)


def plan(model: nn.Module, params: PyTree, x: jax.Array, y: jax.Array,
         loss_fn: LossFn | None = None) -> tuple[dict[str, str], str | None]:
    """(parameter path → rule, why the model falls back to ``vmap`` or None), traced abstractly."""
    out = engine.plan(model, params, x, y, path="fast", loss_fn=loss_fn)
    return out.rule_map, out.reason
