"""Book-keeping from the tapped layers of :mod:`dptune.models.layers` (Bu et al. 2023).

One forward pass over the whole batch records every layer's input ``a``
(the ``dp_taps`` collection, under the name of its rule); one backward pass
to zero perturbations added to the layer outputs (never to the parameters)
gives every example's output gradient ``g`` at once. This is the fastest
path for dptune's built-in models: no per-example work beyond the rules.

Precondition, checked by the caller: the model does not mix examples (no
cross-example statistics), so ∂(Σℓ)/∂yᵢ = ∂ℓᵢ/∂yᵢ. Built-in models satisfy it
by construction; models given by import path are never sent here.
A model is covered when every parameterised module is one of those layers,
called once per forward pass; otherwise :class:`Unsupported` says why.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dptune.models.layers import TAPS
from dptune.trainer.clipping.rules import RULES, Piece, Unsupported, conv_rule

PyTree = Any
Pieces = dict[tuple[str, ...], Piece]
BatchLoss = Callable[[jax.Array, jax.Array], jax.Array]


def _is_layer(node: dict) -> bool:
    return any(not isinstance(v, dict) for v in node.values())


def _layer_pieces(params: dict, taps: dict, grads: dict, k: int, rules: dict, path: tuple[str, ...],
                  out: Pieces, names: dict[tuple[str, ...], str]) -> None:
    """Walk the parameter tree; each leaf module is paired with its tap and its output gradient."""
    where = "/".join(path)
    if not _is_layer(params):
        for name, sub in params.items():
            _layer_pieces(sub, taps.get(name, {}), grads.get(name, {}), k, rules, path + (name,), out, names)
        return
    if any(isinstance(v, dict) for v in params.values()):
        raise Unsupported(f"{where}: a module with both parameters and submodules")
    recorded = [(rule, inputs) for rule, inputs in taps.items() if not isinstance(inputs, dict)]
    if len(recorded) != 1 or "out" not in grads:
        raise Unsupported(f"{where}: parameters {sorted(params)} come from a layer outside dptune.models.layers")
    rule, inputs = recorded[0]
    if len(inputs) != 1:
        raise Unsupported(f"{where}: layer called {len(inputs)} times (shared weights)")
    pieces = rules[rule](params, inputs[0], grads["out"], k)
    if set(pieces) != set(params):
        raise Unsupported(f"{where}: rule {rule!r} covers {sorted(pieces)}, parameters are {sorted(params)}")
    for name, piece in pieces.items():
        out[path + (name,)] = piece
        names[path + (name,)] = "conv" if rule == "conv_ws" else rule


def pieces(model: nn.Module, params: PyTree, x: jax.Array, y: jax.Array, losses: BatchLoss,
           varying_axes: tuple[str, ...] = (), conv_norms: str = "auto") -> tuple[Pieces, dict]:
    """One forward and one backward (to layer outputs only) → a :class:`Piece` and a rule per parameter leaf.

    ``losses(logits [B], labels [B]) -> [B]``. ``x`` may hold k consecutive
    augmented copies of each of the ``len(y)`` examples; an example's gradient
    is then the mean over its copies. ``varying_axes``: inside ``shard_map``,
    the zero perturbations are made device-varying, or their gradients would
    be summed across devices.
    """
    k = x.shape[0] // y.shape[0]
    labels = jnp.repeat(y, k, axis=0) if k > 1 else y
    shapes = jax.eval_shape(
        lambda: model.apply({"params": params}, x, mutable=["perturbations"])[1].get("perturbations", {})
    )
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    if varying_axes:
        zeros = jax.lax.pcast(zeros, varying_axes, to="varying")

    def total_loss(perturbations: PyTree) -> tuple[jax.Array, dict]:
        logits, state = model.apply({"params": params, "perturbations": perturbations}, x, mutable=[TAPS])
        # Examples never mix, so ∂(Σℓ)/∂yᵢ = ∂ℓᵢ/∂yᵢ for every layer output yᵢ.
        return jnp.sum(losses(logits, labels)) / k, state.get(TAPS, {})

    grads, taps = jax.grad(total_loss, has_aux=True)(zeros)
    out: Pieces = {}
    names: dict[tuple[str, ...], str] = {}
    rules = {**RULES, "conv": functools.partial(conv_rule, norms=conv_norms)}
    _layer_pieces(params, taps, grads, k, rules, (), out, names)
    return out, names
