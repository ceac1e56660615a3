"""Book-keeping clipping: the clipped gradient sum without per-example gradients of the whole model.

Bu et al. 2023, "Differentially Private Optimization on Large Model at Small
Cost" (book-keeping, fastDP); Li et al. 2022 (ghost norms of linear layers).

For a layer ``y = f(a; θ)`` the gradient of example *i* with respect to θ is a
function of that example's layer input ``aᵢ`` and output gradient
``gᵢ = ∂ℓᵢ/∂yᵢ`` alone. One forward pass that records every ``a`` and one
backward pass to the layer outputs (never to the parameters) give all of them
(:mod:`dptune.models.layers` records them). Per layer, a *rule* turns (a, g) into

* each example's gradient norm for each parameter — for a dense kernel
  ‖aᵢ‖·‖gᵢ‖, without forming aᵢᵀgᵢ; for a convolution kernel, per layer
  whichever costs fewer operations ("mixed", Bu et al. 2023): the small
  per-example kernel gradient (k·k·c_in·c_out numbers) from k² shifted
  batched matmuls, or Gram matrices of the layer's input patches and output
  gradients (ghost norm, Li et al. 2022), cheaper where the spatial size is
  small and the channels many;
* the weighted sum Σᵢ wᵢ·∇θℓᵢ for any weights w — for a dense kernel the
  single matmul (w⊙a)ᵀg; for a ghost-norm convolution one kernel gradient of
  the whole batch with output gradients wᵢ·gᵢ.

The clip weights ``wᵢ = min(1, C/‖∇ℓᵢ‖)`` come from the global norms, then one
weighted sum per parameter gives the clipped sum: no second backward pass.

Contract (tested against the ``vmap`` reference in ``tests/test_bookkeeping.py``):
the result equals :func:`dptune.trainer.dp_step.clipped_sum` of the per-example
gradients within float tolerance, so every invariant of that function holds
here too: each kept example contributes norm ≤ C; padding (mask 0) and
examples with a non-finite gradient contribute exactly zero; norms are
computed with per-example rescaling, so huge finite gradients are clipped
rather than overflowing.

A model is supported when every parameterised module is one of
:mod:`dptune.models.layers` called once per forward pass; otherwise
:func:`plan` says why and the caller uses the ``vmap`` path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dptune.errors import ConfigError
from dptune.models.freezing import apply_mask
from dptune.models.layers import TAPS, same_padding, standardize

PyTree = Any


class Piece(NamedTuple):
    """One parameter's per-example view: each example's gradient norm, and Σᵢ wᵢ·gradᵢ."""

    norms: jax.Array  # [B]
    weighted: Callable[[jax.Array, jax.Array], jax.Array]  # (w, keep) -> parameter-shaped sum


def as_f32(x: jax.Array) -> jax.Array:
    """``x`` in float32 (or wider, if it already is).

    Per-example norms, clip weights and clipped sums are computed at this
    precision on every clipping path: a norm taken in bf16 is off by up to
    ~1% from the f32 sum that holds the example, which then exceeds C.
    """
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def robust_norm(x: jax.Array) -> jax.Array:
    """Per-row L2 norm (leading axis = examples), rescaled by the row's max so squares cannot overflow.

    Computed in float32 (:func:`as_f32`). NaN if the row holds a NaN or ±inf.
    """
    flat = as_f32(x).reshape(x.shape[0], -1)
    m = jnp.max(jnp.abs(flat), axis=1)
    safe = jnp.where(m > 0, m, 1.0)
    return m * jnp.sqrt(jnp.sum(jnp.square(flat / safe[:, None]), axis=1))


def _rows(keep: jax.Array, x: jax.Array) -> jax.Array:
    # where, not multiply: a dropped row may hold NaN, and 0·NaN is NaN.
    return jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0)


def _grouped(per_row: jax.Array, k: int) -> jax.Array:
    """Sum each example's k consecutive rows (its augmented copies)."""
    return per_row if k == 1 else per_row.reshape(-1, k, *per_row.shape[1:]).sum(axis=1)


def _materialised(per_example: jax.Array) -> Piece:
    # The norm and the sum read the same float32 numbers.
    per_example = as_f32(per_example)
    return Piece(robust_norm(per_example), lambda w, keep: jnp.tensordot(w, _rows(keep, per_example), axes=1))


def dense_rule(params: Mapping[str, jax.Array], a: jax.Array, g: jax.Array, k: int = 1) -> dict[str, Piece]:
    """``y = a·W + b``. Flat inputs: ‖∇W‖ = ‖a‖·‖g‖ and Σ wᵢ∇Wᵢ = (w⊙a)ᵀg; sequences or k copies: ∇W formed."""
    b = a.shape[0] // k
    a3, g3 = as_f32(a).reshape(b, -1, a.shape[-1]), as_f32(g).reshape(b, -1, g.shape[-1])
    if a3.shape[1] == 1:
        a2, g2 = a3[:, 0], g3[:, 0]
        pieces = {"kernel": Piece(
            robust_norm(a2) * robust_norm(g2),
            lambda w, keep: (w[:, None] * _rows(keep, a2)).T @ _rows(keep, g2),
        )}
    else:
        pieces = {"kernel": _materialised(jnp.einsum("bti,bto->bio", a3, g3))}
    if "bias" in params:
        pieces["bias"] = _materialised(g3.sum(axis=1))
    return pieces


def _same_geometry(a_shape: tuple[int, ...], g_shape: tuple[int, ...], k: int) -> tuple[int, list[tuple[int, int]]]:
    """Stride and SAME padding of a convolution, read from its input and output shapes (out = ⌈in / stride⌉)."""
    _, h, w_in, _ = a_shape
    _, ho, wo, _ = g_shape
    s = -(-h // ho)
    return s, same_padding((h, w_in), (ho, wo), k, s)


def conv_kernel_grads(a: jax.Array, g: jax.Array, kernel_size: int) -> jax.Array:
    """Per-example kernel gradients [B, k, k, c_in, c_out] of a SAME-padded NHWC convolution.

    Stride is read from the shapes (out = ⌈in / stride⌉). Each kernel offset is
    one batched matmul of the shifted input against the output gradient.
    """
    k = kernel_size
    s, pads = _same_geometry(a.shape, g.shape, k)
    _, ho, wo, _ = g.shape
    padded = jnp.pad(a, ((0, 0), pads[0], pads[1], (0, 0)))
    rows = []
    for di in range(k):
        cols = []
        for dj in range(k):
            window = padded[:, di: di + (ho - 1) * s + 1: s, dj: dj + (wo - 1) * s + 1: s, :]
            cols.append(jnp.einsum("bhwc,bhwo->bco", window, g))
        rows.append(jnp.stack(cols, axis=1))
    return jnp.stack(rows, axis=1)


def conv_ghost_norms(a: jax.Array, g: jax.Array, kernel_size: int) -> jax.Array:
    """Each example's kernel-gradient norm from Gram matrices, without forming the gradient (Bu et al. 2023).

    With uₚ the input patch seen by output position p,
    ‖∇Wᵢ‖² = Σₚ,q ⟨uₚ, u_q⟩⟨gₚ, g_q⟩, and the patch Gram is the sum over the k²
    kernel offsets of the Gram of the (padded) input with itself, shifted.
    Inputs are rescaled per example by their largest entry, so squares cannot
    overflow; a NaN or ±inf anywhere in an example gives NaN.
    """
    k = kernel_size
    s, pads = _same_geometry(a.shape, g.shape, k)
    _, ho, wo, _ = g.shape
    ma = jnp.max(jnp.abs(a.reshape(a.shape[0], -1)), axis=1)
    mg = jnp.max(jnp.abs(g.reshape(g.shape[0], -1)), axis=1)
    a = a / jnp.where(ma > 0, ma, 1.0)[:, None, None, None]
    g = g / jnp.where(mg > 0, mg, 1.0)[:, None, None, None]
    padded = jnp.pad(a, ((0, 0), pads[0], pads[1], (0, 0)))
    raw = jnp.einsum("bxyc,buvc->bxyuv", padded, padded)
    patch = sum(
        raw[:, di: di + (ho - 1) * s + 1: s, dj: dj + (wo - 1) * s + 1: s,
            di: di + (ho - 1) * s + 1: s, dj: dj + (wo - 1) * s + 1: s]
        for di in range(k) for dj in range(k)
    )
    sq = jnp.einsum("bijkl,bijkl->b", patch, jnp.einsum("bijo,bklo->bijkl", g, g))
    return ma * mg * jnp.sqrt(jnp.maximum(sq, 0.0))


def conv_weighted_sum(a: jax.Array, g: jax.Array, kernel_shape: tuple[int, ...], w: jax.Array,
                      keep: jax.Array) -> jax.Array:
    """Σᵢ wᵢ·∇Wᵢ as one kernel gradient of the whole batch with output gradients wᵢ·gᵢ (no per-example work).

    Written as the convolution that computes a kernel gradient (input with
    batch and channel axes swapped, output gradient as the kernel dilated by
    the stride), not as a VJP: inside ``shard_map`` a VJP against a
    device-invariant kernel would be summed over devices here already.
    """
    k = kernel_shape[0]
    s, pads = _same_geometry(a.shape, g.shape, k)
    _, h, w_in, _ = a.shape
    _, ho, wo, _ = g.shape
    a = _rows(keep, a)
    gw = _rows(keep, g) * w.reshape(-1, 1, 1, 1).astype(g.dtype)
    # High padding (negative: cropped) so that exactly k offsets fit in each direction.
    padding = [(pads[0][0], (ho - 1) * s + k - h - pads[0][0]), (pads[1][0], (wo - 1) * s + k - w_in - pads[1][0])]
    return jax.lax.conv_general_dilated(a, gw, (1, 1), padding, rhs_dilation=(s, s),
                                        dimension_numbers=("CHWN", "IHWO", "HWNC"))


# "auto": per layer, Gram-matrix norms where they cost fewer operations than
# forming per-example kernel gradients (deep, narrow-spatial layers), else the latter.
CONV_NORMS: tuple[str, ...] = ("auto", "ghost", "materialise")


def conv_uses_ghost(a_shape: tuple[int, ...], g_shape: tuple[int, ...], kernel_size: int,
                    mode: str = "auto") -> bool:
    """Whether a layer's norms come from Gram matrices: by operation count, unless ``mode`` forces a side."""
    if mode not in CONV_NORMS:
        raise ConfigError("conv_norms", f"unknown {mode!r}; allowed: {', '.join(CONV_NORMS)}")
    if mode != "auto":
        return mode == "ghost"
    # Off by default: in float32 the Gram-matrix norm of an example whose positions nearly cancel is
    # rounding error, below the term the batched sum computes for it, so a crafted example could
    # contribute more than C (the dense case measured 1.96·C; review of issue #17). The materialised
    # per-example kernel gradient gives the norm and the sum from the same numbers.
    return False


def conv_rule(params: Mapping[str, jax.Array], a: jax.Array, g: jax.Array, k: int = 1, standardized: bool = False,
              norms: str = "auto") -> dict[str, Piece]:
    """SAME convolution; with weight standardisation the kernel gradients go through its VJP at θ.

    Without standardisation or augmented copies, layers where it is cheaper
    (:func:`conv_uses_ghost`) take their norms from Gram matrices and their
    weighted sum from one batch kernel gradient; the others form each
    example's kernel gradient.
    """
    kernel = params["kernel"]
    a, g = as_f32(a), as_f32(g)
    if not standardized and k == 1 and conv_uses_ghost(a.shape, g.shape, kernel.shape[0], norms):
        pieces = {"kernel": Piece(conv_ghost_norms(a, g, kernel.shape[0]),
                                  lambda w, keep: conv_weighted_sum(a, g, kernel.shape, w, keep))}
    else:
        grads = _grouped(conv_kernel_grads(a, g, kernel.shape[0]), k)
        if standardized:
            _, vjp = jax.vjp(standardize, kernel)
            grads = jax.vmap(lambda gk: vjp(gk)[0])(grads)
        pieces = {"kernel": _materialised(grads)}
    if "bias" in params:
        pieces["bias"] = _materialised(_grouped(g.sum(axis=(1, 2)), k))
    return pieces


def affine_rule(params: Mapping[str, jax.Array], x_hat: jax.Array, g: jax.Array, k: int = 1) -> dict[str, Piece]:
    """``y = x̂·scale + bias`` per channel (GroupNorm's affine part)."""
    axes = tuple(range(1, g.ndim - 1))
    x_hat, g = as_f32(x_hat), as_f32(g)
    return {"scale": _materialised(_grouped((x_hat * g).sum(axis=axes), k)),
            "bias": _materialised(_grouped(g.sum(axis=axes), k))}


RULES: dict[str, Callable[..., dict[str, Piece]]] = {
    "dense": dense_rule,
    "conv": conv_rule,
    "conv_ws": lambda p, a, g, k=1: conv_rule(p, a, g, k, standardized=True),
    "affine": affine_rule,
}


class Unsupported(Exception):
    """The model has a parameterised module that book-keeping cannot see; use the vmap path."""


def _is_layer(node: dict) -> bool:
    return any(not isinstance(v, dict) for v in node.values())


def _pieces(params: PyTree, taps: dict, grads: dict, k: int, rules: dict, path: str = "") -> PyTree:
    """Walk the parameter tree; each leaf module is paired with its tap and its output gradient."""
    if not _is_layer(params):
        return {name: _pieces(sub, taps.get(name, {}), grads.get(name, {}), k, rules, f"{path}/{name}")
                for name, sub in params.items()}
    if any(isinstance(v, dict) for v in params.values()):
        raise Unsupported(f"{path}: a module with both parameters and submodules")
    recorded = [(rule, inputs) for rule, inputs in taps.items() if not isinstance(inputs, dict)]
    if len(recorded) != 1 or "out" not in grads:
        raise Unsupported(f"{path}: parameters {sorted(params)} come from a layer outside dptune.models.layers")
    rule, inputs = recorded[0]
    if len(inputs) != 1:
        raise Unsupported(f"{path}: layer called {len(inputs)} times (shared weights)")
    pieces = rules[rule](params, inputs[0], grads["out"], k)
    if set(pieces) != set(params):
        raise Unsupported(f"{path}: rule {rule!r} covers {sorted(pieces)}, parameters are {sorted(params)}")
    return pieces


def per_example_pieces(model: nn.Module, params: PyTree, x: jax.Array, y: jax.Array,
                       varying_axis: str | None = None, conv_norms: str = "auto",
                       losses: Callable[[jax.Array, jax.Array], jax.Array] | None = None) -> PyTree:
    """One forward and one backward (to layer outputs only) → a :class:`Piece` per parameter.

    ``varying_axis``: inside ``shard_map``, the zero perturbations must be
    device-varying, or their gradients would be summed across devices.

    ``x`` may hold k consecutive augmented copies of each of the ``len(y)``
    examples; an example's gradient is then the mean over its copies.
    """
    k = x.shape[0] // y.shape[0]
    labels = jnp.repeat(y, k) if k > 1 else y
    shapes = jax.eval_shape(
        lambda: model.apply({"params": params}, x, mutable=["perturbations"])[1].get("perturbations", {})
    )
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    if varying_axis is not None:
        zeros = jax.lax.pcast(zeros, varying_axis, to="varying")

    def total_loss(perturbations: PyTree) -> tuple[jax.Array, dict]:
        logits, state = model.apply({"params": params, "perturbations": perturbations}, x, mutable=[TAPS])
        # Examples never mix, so ∂(Σℓ)/∂yᵢ = ∂ℓᵢ/∂yᵢ for every layer output yᵢ.
        per_example = (losses or optax.softmax_cross_entropy_with_integer_labels)(logits, labels)
        return jnp.sum(per_example) / k, state.get(TAPS, {})

    grads, taps = jax.grad(total_loss, has_aux=True)(zeros)
    return _pieces(params, taps, grads, k, {**RULES, "conv": functools.partial(conv_rule, norms=conv_norms)})


def plan(model: nn.Module, params: PyTree, x: jax.Array, y: jax.Array,
         losses: Callable[[jax.Array, jax.Array], jax.Array] | None = None) -> str | None:
    """None if book-keeping covers every parameter of ``model``; otherwise the reason it does not."""
    try:
        jax.eval_shape(lambda p, xx, yy: jax.tree_util.tree_map(
            lambda piece: piece.norms, per_example_pieces(model, p, xx, yy, losses=losses),
            is_leaf=lambda n: isinstance(n, Piece)), params, x, y)
    except Unsupported as e:
        return str(e)
    return None


def global_norms(pieces: PyTree) -> jax.Array:
    """Each example's gradient norm over all parameters, combined without overflow; NaN if non-finite."""
    norms = jnp.stack([p.norms for p in jax.tree_util.tree_leaves(pieces, is_leaf=lambda n: isinstance(n, Piece))])
    return robust_norm(norms.T)  # [examples, parameters]: the norm of the per-parameter norms


def clipped_sum(model: nn.Module, params: PyTree, x: jax.Array, y: jax.Array, mask: jax.Array,
                clip_norm: jax.Array | float, varying_axis: str | None = None,
                trainable: PyTree | None = None, conv_norms: str = "auto",
                losses: Callable[[jax.Array, jax.Array], jax.Array] | None = None) -> PyTree:
    """Σᵢ maskᵢ · min(1, C/‖∇ℓᵢ‖) · ∇ℓᵢ by book-keeping; same contract as :func:`dptune.trainer.dp_step.clipped_sum`.

    ``trainable`` (0/1 per leaf, :mod:`dptune.models.freezing`): frozen leaves are left
    out of the norms and the sum. ``conv_norms`` (:data:`CONV_NORMS`): how
    convolution layers get their per-example norms; every choice gives the same sum.
    """
    pieces = per_example_pieces(model, params, x, y, varying_axis, conv_norms, losses)
    if trainable is not None:
        pieces = jax.tree_util.tree_map(
            lambda p, m: Piece(jnp.where(m > 0, p.norms, 0.0), p.weighted), pieces, trainable,
            is_leaf=lambda n: isinstance(n, Piece))
    norms = global_norms(pieces)
    keep = (mask > 0) & jnp.isfinite(norms)
    tiny = jnp.finfo(norms.dtype).tiny
    w = jnp.where(keep, jnp.minimum(1.0, clip_norm / jnp.maximum(norms, tiny)), 0.0)
    summed = jax.tree_util.tree_map(lambda p: p.weighted(w, keep), pieces, is_leaf=lambda n: isinstance(n, Piece))
    return apply_mask(summed, trainable)
