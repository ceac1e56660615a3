"""The clipping engine: Σᵢ wᵢ·∇ℓᵢ with sensitivity C, by the fastest path that covers the model.

Contract of :func:`clipped_sum`, whatever path computes it: every example
with mask 1 and a finite gradient contributes a term of L2 norm ≤ C over all
trainable parameters together; padding and non-finite examples contribute
exactly zero; so adding or removing one example moves the sum by at most C
(the Gaussian mechanism's sensitivity). Norms, weights and sums are float32
or wider. The weights are those of :mod:`dptune.trainer.clipping.weights`
("clip" or "normalize"), shared by every path.

Paths, fastest first:

* ``bookkeeping`` — dptune's tapped layers, whole-batch forward and backward
  (:mod:`dptune.trainer.clipping.tapped`; Bu et al. 2023);
* ``fast`` — any Flax model, per-example records by interception
  (:mod:`dptune.trainer.clipping.intercept`; Li et al. 2022, Bu et al. 2023);
* ``vmap`` — per-example gradients of the whole model, the reference and the
  fallback (:mod:`dptune.trainer.clipping.vmap`).

The rules it took and why it fell back are returned as values in
:class:`ClipResult` (static pytree fields), so ``jax.eval_shape`` of the
same call reports them without computing anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from dptune.choices import Clipping
from dptune.errors import ConfigError
from dptune.models.freezing import apply_mask
from dptune.trainer.clipping import intercept, tapped
from dptune.trainer.clipping import vmap as reference
from dptune.trainer.clipping.rules import Piece, Unsupported, robust_norm
from dptune.trainer.clipping.weights import WEIGHTS

PyTree = Any
LossFn = Callable[[jax.Array, jax.Array], jax.Array]
# The values of the ``clipping`` setting, and the paths the engine takes.
SETTINGS: tuple[str, ...] = tuple(c.value for c in Clipping)
PATHS: tuple[str, ...] = ("auto", "bookkeeping", "fast", "vmap")

__all__ = ["PATHS", "SETTINGS", "ClipResult", "Unsupported", "clipped_sum", "cross_entropy", "plan", "resolve"]


def cross_entropy(logits: jax.Array, label: jax.Array) -> jax.Array:
    """The default per-example loss: softmax cross-entropy of one example's logits and integer label."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, label)


@flax.struct.dataclass
class ClipResult:
    """A clipped sum and what produced it.

    ``grads``: Σᵢ wᵢ·∇ℓᵢ, shaped like the parameters (float32 or wider).
    ``norms``: each example's global gradient norm (∞ or NaN: non-finite, dropped).
    ``weights``: each wᵢ (0 for padding and dropped examples).
    ``path``: "bookkeeping", "fast" or "vmap"; ``weighting``: "clip" or "normalize".
    ``rules``: (parameter path, rule) for every parameter leaf.
    ``reason``: why a faster path was not taken (None if none was passed over).
    """

    grads: PyTree
    norms: jax.Array
    weights: jax.Array
    path: str = flax.struct.field(pytree_node=False)
    weighting: str = flax.struct.field(pytree_node=False, default="clip")
    rules: tuple[tuple[str, str], ...] = flax.struct.field(pytree_node=False, default=())
    reason: str | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def rule_map(self) -> dict[str, str]:
        """``rules`` as a dict: parameter path ("Block_0/Dense_0/kernel") → rule."""
        return dict(self.rules)

    @property
    def label(self) -> str:
        """The clipping a run reports: the path, or "normalize" for normalised weights."""
        return "normalize" if self.weighting == "normalize" else self.path


def resolve(setting: str, custom_model: bool = False) -> tuple[str, str]:
    """(path, weighting) of a ``clipping`` setting; the one place its values are interpreted.

    ``normalize`` is the fastest path with normalised weights. A model given by
    import path never takes ``bookkeeping``: a whole-batch backward pass is per
    example only if the model is, and the forward check at create cannot see a
    model that mixes examples in its gradients alone; ``auto`` is then ``fast``.

    Raises:
        ConfigError: an unknown setting, or ``bookkeeping`` for a custom model.
    """
    if setting not in SETTINGS:
        raise ConfigError("clipping", f"unknown {setting!r}; allowed: {', '.join(SETTINGS)}")
    path, weighting = ("auto", "normalize") if setting == "normalize" else (setting, "clip")
    if custom_model and path == "bookkeeping":
        raise ConfigError("clipping", "'bookkeeping' is for dptune's built-in models; a model by import path "
                                      "takes auto, fast or vmap")
    return ("fast" if custom_model and path == "auto" else path), weighting


def _leaf_keys(params: PyTree) -> list[tuple[str, ...]]:
    return [tuple(str(getattr(k, "key", k)) for k in kp) for kp, _ in jax.tree_util.tree_leaves_with_path(params)]


def _from_pieces(params: PyTree, pieces: dict[tuple[str, ...], Piece], mask: jax.Array,
                 clip_norm: jax.Array | float, weighting: str, trainable: PyTree | None) -> tuple:
    """(sum, norms, weights) from one piece per parameter leaf; frozen leaves are out of the norms and the sum."""
    keys = _leaf_keys(params)
    frozen = [None] * len(keys) if trainable is None else jax.tree_util.tree_leaves(trainable)
    norms_per_leaf = [pieces[k].norms if m is None else jnp.where(m > 0, pieces[k].norms, 0.0)
                      for k, m in zip(keys, frozen, strict=True)]
    norms = robust_norm(jnp.stack(norms_per_leaf).T)  # the norm of the per-parameter norms, without overflow
    keep = (mask > 0) & jnp.isfinite(norms)
    w = WEIGHTS[weighting](norms, jnp.ones_like(norms), keep, clip_norm)
    grads = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params),
                                         [pieces[k].weighted(w, keep) for k in keys])
    return apply_mask(grads, trainable), norms, w


def _rule_based(path: str, model: nn.Module, params: PyTree, x: jax.Array, y: jax.Array, loss_fn: LossFn,
                axes: frozenset, conv_norms: str) -> tuple[dict, dict]:
    """The pieces and rule names of ``path`` ("bookkeeping" or "fast"), or :class:`Unsupported`."""
    if path == "bookkeeping":
        return tapped.pieces(model, params, x, y, jax.vmap(loss_fn), tuple(sorted(axes)), conv_norms)
    if x.shape[0] != y.shape[0]:
        raise Unsupported("augmentation copies are clipped on the vmap path")
    return intercept.pieces(model, params, x, y, loss_fn, axes)


def clipped_sum(model: nn.Module, params: PyTree, x: jax.Array, y: jax.Array, mask: jax.Array,
                clip_norm: jax.Array | float, *, path: str = "auto", weighting: str = "clip",
                loss_fn: LossFn | None = None, trainable: PyTree | None = None, conv_norms: str = "auto") -> ClipResult:
    """Σᵢ maskᵢ·wᵢ·∇ℓᵢ with every term of norm ≤ C (module docstring), by the first path that covers the model.

    Args:
        model: a Flax linen module applied as ``model.apply({"params": params}, x)``; it must not mix examples.
        params: its parameters.
        x: inputs [B·k, …]: k ≥ 1 consecutive augmented copies of each example, whose gradient is their mean.
        y: labels [B, …], one per example, passed to ``loss_fn``.
        mask: [B]; rows with 0 are padding.
        clip_norm: C (may be traced; ∞ clips nothing).
        path: "auto" (bookkeeping, then fast, then vmap), or one path: "bookkeeping" raises
            :class:`Unsupported` where it does not cover the model; "fast" falls back to "vmap".
            Book-keeping's whole-batch backward pass is per example only for a model known not to mix
            examples (dptune's own); :func:`resolve` never sends a model given by import path there.
        weighting: "clip" (min(1, C/‖g‖)) or "normalize" (C/(‖g‖ + γ)).
        loss_fn: one example's loss ``loss_fn(logits_i, y_i)``; default :func:`cross_entropy`.
        trainable: 0/1 per parameter leaf; frozen leaves are left out of the norms and the sum.
        conv_norms: how tapped convolutions get their norms (:data:`dptune.trainer.clipping.rules.CONV_NORMS`;
            Gram-matrix norms only when "ghost" is asked for).

    Inside ``shard_map`` with ``x`` split over a mesh axis, the sum is this
    device's share (the caller sums it over the axis); parameters and taps
    are made device-varying here, so no example's gradient leaves its device.
    """
    if path not in PATHS:
        raise ConfigError("clipping", f"unknown {path!r}; allowed: {', '.join(PATHS)}")
    loss_fn = loss_fn or cross_entropy
    axes = intercept.varying_axes(x)
    params = intercept.device_varying(params, axes)
    reasons = []
    for candidate in {"auto": ("bookkeeping", "fast"), "vmap": ()}.get(path, (path,)):
        try:
            pieces, rules = _rule_based(candidate, model, params, x, y, loss_fn, axes, conv_norms)
        except Unsupported as e:
            if path == "bookkeeping":
                raise
            reasons.append(str(e))
            continue
        grads, norms, w = _from_pieces(params, pieces, mask, clip_norm, weighting, trainable)
        named = tuple(("/".join(k), rules[k]) for k in _leaf_keys(params))
        return ClipResult(grads, norms, w, candidate, weighting, named, "; ".join(reasons) or None)
    per_example = reference.per_example_grads(model, params, x, y, loss_fn, trainable)
    grads, norms, w = reference.weighted_sum(per_example, mask, clip_norm, WEIGHTS[weighting])
    named = tuple(("/".join(k), "vmap") for k in _leaf_keys(params))
    return ClipResult(grads, norms, w, "vmap", weighting, named, "; ".join(reasons) or ("requested"
                      if path == "vmap" else None))


def plan(model: nn.Module, params: PyTree, x: Any, y: Any, *, path: str = "auto", weighting: str = "clip",
         loss_fn: LossFn | None = None) -> ClipResult:
    """:func:`clipped_sum`'s path, rules and fallback reason, traced abstractly: nothing is computed.

    ``x``, ``y``: arrays or ``jax.ShapeDtypeStruct`` (a small batch will do). The result's arrays are shapes.
    """
    def run(p: PyTree, xx: jax.Array, yy: jax.Array) -> ClipResult:
        return clipped_sum(model, p, xx, yy, jnp.ones(yy.shape[0]), 1.0, path=path, weighting=weighting,
                           loss_fn=loss_fn)
    return jax.eval_shape(run, params, x, y)
