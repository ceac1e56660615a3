"""The registry of per-layer rules: each example's gradient norm and the weighted sum from (a, g).

For a layer ``y = f(a; θ)`` the gradient of example *i* with respect to θ is
a function of that example's layer input ``aᵢ`` and output gradient
``gᵢ = ∂ℓᵢ/∂yᵢ`` alone (book-keeping, Bu et al. 2023, "Differentially
Private Optimization on Large Model at Small Cost"; ghost clipping, Li et
al. 2022, "Large Language Models Can Be Strong Differentially Private
Learners"). A *rule* turns (own parameters, a, g) into one :class:`Piece`
per parameter: each example's norm of that parameter's gradient and, for
any weights w, Σᵢ wᵢ·∇θℓᵢ.

Contract of every rule: the norm and the weighted sum are computed from the
same float32 numbers, so a term wᵢ·∇θℓᵢ never has a larger norm than the
norm the weight was derived from; with the global weight of
:mod:`dptune.trainer.clipping.weights` every example then contributes at most
C. Gram-matrix ("ghost") norms are kept but off: in float32 the norm of an
example whose positions nearly cancel is rounding error, below the term the
separately computed sum holds for it (a crafted example moved the sum by
1.96·C).

``k`` > 1: ``a`` and ``g`` hold k consecutive augmented copies of each
example, whose gradients are summed per example before the norm.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dptune.errors import ConfigError
from dptune.models.layers import same_padding, standardize
from dptune.trainer.clipping.weights import as_f32

# Every rule name a parameter can report: the closed forms of RULES, then the general ones.
RULE_NAMES: tuple[str, ...] = ("dense", "conv", "norm_affine", "embed", "layer_vjp", "tied", "vmap")


class Unsupported(Exception):
    """No rule covers some parameter of the model; the engine falls back towards the vmap reference."""


class Piece(NamedTuple):
    """One parameter's per-example view: each example's gradient norm, and Σᵢ wᵢ·gradᵢ."""

    norms: jax.Array  # [B]
    weighted: Callable[[jax.Array, jax.Array], jax.Array]  # (w, keep) -> parameter-shaped sum


def robust_norm(x: jax.Array) -> jax.Array:
    """Per-row L2 norm (leading axis = examples), rescaled by the row's max so squares cannot overflow.

    Computed in float32 (:func:`as_f32`). NaN if the row holds a NaN or ±inf.
    """
    flat = as_f32(x).reshape(x.shape[0], -1)
    m = jnp.max(jnp.abs(flat), axis=1)
    safe = jnp.where(m > 0, m, 1.0)
    return m * jnp.sqrt(jnp.sum(jnp.square(flat / safe[:, None]), axis=1))


def rows(keep: jax.Array, x: jax.Array) -> jax.Array:
    """``x`` with dropped rows zeroed."""
    # where, not multiply: a dropped row may hold NaN, and 0·NaN is NaN.
    return jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0)


def grouped(per_row: jax.Array, k: int) -> jax.Array:
    """Sum each example's k consecutive rows (its augmented copies)."""
    return per_row if k == 1 else per_row.reshape(-1, k, *per_row.shape[1:]).sum(axis=1)


def materialised(per_example: jax.Array) -> Piece:
    """A piece from per-example gradients [B, …] formed explicitly."""
    # The norm and the sum read the same float32 numbers.
    per_example = as_f32(per_example)
    return Piece(robust_norm(per_example), lambda w, keep: jnp.tensordot(w, rows(keep, per_example), axes=1))


def reshaped(piece: Piece, shape: tuple[int, ...], transpose: bool = False) -> Piece:
    """The same piece with its weighted sum (transposed and) reshaped to the parameter's shape."""
    def weighted(w: jax.Array, keep: jax.Array) -> jax.Array:
        s = piece.weighted(w, keep)
        return (s.T if transpose else s).reshape(shape)
    return Piece(piece.norms, weighted)


# ----------------------------------------------------------------------------- dense

def ghost_dense_norms(a: jax.Array, g: jax.Array) -> jax.Array:
    """‖Σₜ aₜᵀgₜ‖ per example from Gram matrices (Li et al. 2022): Σₜ,ₛ ⟨aₜ, aₛ⟩⟨gₜ, gₛ⟩, without forming aᵀg.

    ``a`` [B, T, d_in], ``g`` [B, T, d_out]. Each example is rescaled by its
    largest entry first, so squares cannot overflow; NaN if non-finite.
    """
    ma = jnp.max(jnp.abs(a.reshape(a.shape[0], -1)), axis=1)
    mg = jnp.max(jnp.abs(g.reshape(g.shape[0], -1)), axis=1)
    a = a / jnp.where(ma > 0, ma, 1.0)[:, None, None]
    g = g / jnp.where(mg > 0, mg, 1.0)[:, None, None]
    sq = jnp.einsum("bts,bts->b", jnp.einsum("bti,bsi->bts", a, a), jnp.einsum("bto,bso->bts", g, g))
    return ma * mg * jnp.sqrt(jnp.maximum(sq, 0.0))


def dense_uses_ghost(tokens: int, d_in: int, d_out: int) -> bool:
    """Whether a dense layer's norms come from Gram matrices: never (float32 cancellation, module docstring).

    They would cost less (T²·(d_in+d_out) per example against T·d_in·d_out) when T is small.
    """
    del tokens, d_in, d_out
    return False


def dense_rule(own: Mapping[str, jax.Array], a: jax.Array, g: jax.Array, k: int = 1) -> dict[str, Piece]:
    """``y = a·W (+ b)`` on the last axis; a [B·k, …, d_in], g [B·k, …, d_out].

    One position per example: ‖∇W‖ = ‖a‖·‖g‖ and Σ wᵢ∇Wᵢ = (w⊙a)ᵀg, nothing
    per-example formed; several positions or copies: ∇Wᵢ = Σₜ aₜᵀgₜ formed.
    """
    b = a.shape[0] // k
    a3 = as_f32(a).reshape(b, -1, a.shape[-1])
    g3 = as_f32(g).reshape(b, -1, g.shape[-1])
    if a3.shape[1] == 1:
        a2, g2 = a3[:, 0], g3[:, 0]
        kernel = Piece(robust_norm(a2) * robust_norm(g2),
                       lambda w, keep: (w[:, None] * rows(keep, a2)).T @ rows(keep, g2))
    elif dense_uses_ghost(a3.shape[1], a3.shape[2], g3.shape[2]):
        kernel = Piece(ghost_dense_norms(a3, g3),
                       lambda w, keep: jnp.einsum("bti,bto->io", w[:, None, None] * rows(keep, a3), rows(keep, g3)))
    else:
        kernel = materialised(jnp.einsum("bti,bto->bio", a3, g3))
    pieces = {"kernel": kernel}
    if "bias" in own:
        pieces["bias"] = materialised(g3.sum(axis=1))
    return pieces


# ----------------------------------------------------------------------------- convolution

def _same_geometry(a_shape: tuple[int, ...], g_shape: tuple[int, ...], k: int) -> tuple[int, list[tuple[int, int]]]:
    """Stride and SAME padding of a convolution, read from its input and output shapes (out = ⌈in / stride⌉)."""
    _, h, w_in, _ = a_shape
    _, ho, wo, _ = g_shape
    s = -(-h // ho)
    return s, same_padding((h, w_in), (ho, wo), k, s)


def conv_kernel_grads(a: jax.Array, g: jax.Array, kernel_size: int) -> jax.Array:
    """Per-example kernel gradients [B, k, k, c_in, c_out] of a SAME-padded NHWC convolution.

    Each kernel offset is one batched matmul of the shifted input against the
    output gradient (faster on CPU than the Gram trick or conv patches).
    """
    k = kernel_size
    s, pads = _same_geometry(a.shape, g.shape, k)
    _, ho, wo, _ = g.shape
    padded = jnp.pad(a, ((0, 0), pads[0], pads[1], (0, 0)))
    out = []
    for di in range(k):
        cols = []
        for dj in range(k):
            window = padded[:, di: di + (ho - 1) * s + 1: s, dj: dj + (wo - 1) * s + 1: s, :]
            cols.append(jnp.einsum("bhwc,bhwo->bco", window, g))
        out.append(jnp.stack(cols, axis=1))
    return jnp.stack(out, axis=1)


def conv_ghost_norms(a: jax.Array, g: jax.Array, kernel_size: int) -> jax.Array:
    """Each example's kernel-gradient norm from Gram matrices, without forming the gradient (Bu et al. 2023).

    ‖∇Wᵢ‖² = Σₚ,q ⟨uₚ, u_q⟩⟨gₚ, g_q⟩ over input patches u; the patch Gram is the
    sum over the k² kernel offsets of the shifted Gram of the padded input.
    Rescaled per example, so squares cannot overflow; NaN if non-finite.
    Off by default (:func:`conv_uses_ghost`).
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

    Written as the convolution that computes a kernel gradient, not as a VJP:
    inside ``shard_map`` a VJP against a device-invariant kernel would be
    summed over devices here already.
    """
    k = kernel_shape[0]
    s, pads = _same_geometry(a.shape, g.shape, k)
    _, h, w_in, _ = a.shape
    _, ho, wo, _ = g.shape
    a = rows(keep, a)
    gw = rows(keep, g) * w.reshape(-1, 1, 1, 1).astype(g.dtype)
    # High padding (negative: cropped) so that exactly k offsets fit in each direction.
    padding = [(pads[0][0], (ho - 1) * s + k - h - pads[0][0]), (pads[1][0], (wo - 1) * s + k - w_in - pads[1][0])]
    return jax.lax.conv_general_dilated(a, gw, (1, 1), padding, rhs_dilation=(s, s),
                                        dimension_numbers=("CHWN", "IHWO", "HWNC"))


CONV_NORMS: tuple[str, ...] = ("auto", "ghost", "materialise")


def conv_uses_ghost(a_shape: tuple[int, ...], g_shape: tuple[int, ...], kernel_size: int,
                    mode: str = "auto") -> bool:
    """Whether a layer's norms come from Gram matrices: only when ``mode`` asks ("auto" is off, see module)."""
    del a_shape, g_shape, kernel_size
    if mode not in CONV_NORMS:
        raise ConfigError("conv_norms", f"unknown {mode!r}; allowed: {', '.join(CONV_NORMS)}")
    return mode == "ghost"


def conv_rule(own: Mapping[str, jax.Array], a: jax.Array, g: jax.Array, k: int = 1, standardized: bool = False,
              norms: str = "auto") -> dict[str, Piece]:
    """SAME NHWC convolution; with weight standardisation the kernel gradients go through its VJP at θ."""
    kernel = own["kernel"]
    a, g = as_f32(a), as_f32(g)
    if not standardized and k == 1 and conv_uses_ghost(a.shape, g.shape, kernel.shape[0], norms):
        pieces = {"kernel": Piece(conv_ghost_norms(a, g, kernel.shape[0]),
                                  lambda w, keep: conv_weighted_sum(a, g, kernel.shape, w, keep))}
    else:
        grads = grouped(conv_kernel_grads(a, g, kernel.shape[0]), k)
        if standardized:
            _, vjp = jax.vjp(standardize, kernel)
            grads = jax.vmap(lambda gk: vjp(gk)[0])(grads)
        pieces = {"kernel": materialised(grads)}
    if "bias" in own:
        pieces["bias"] = materialised(grouped(g.sum(axis=(1, 2)), k))
    return pieces


# ----------------------------------------------------------------------------- normalisation and embedding

def affine_rule(own: Mapping[str, jax.Array], x_hat: jax.Array, g: jax.Array, k: int = 1) -> dict[str, Piece]:
    """``y = x̂·scale + bias`` per channel on the last axis (GroupNorm, LayerNorm, RMSNorm's affine part)."""
    axes = tuple(range(1, g.ndim - 1))
    x_hat, g = as_f32(x_hat), as_f32(g)
    pieces = {}
    if "scale" in own:
        pieces["scale"] = materialised(grouped((x_hat * g).sum(axis=axes), k))
    if "bias" in own:
        pieces["bias"] = materialised(grouped(g.sum(axis=axes), k))
    return pieces


def embed_rows(ids: jax.Array, vocab: int) -> jax.Array:
    """The table row each id reads in ``jnp.take(table, ids, axis=0)`` (the lookup of ``nn.Embed``); −1 for none.

    Asked of ``jnp.take`` itself, so that the ids are normalised exactly as in
    the forward pass and its VJP: ids in [−vocab, 0) wrap once; any other id
    outside [0, vocab) reads a NaN row forward and its gradient is dropped by
    the VJP's scatter.
    """
    return jnp.take(jnp.arange(vocab), ids, axis=0, fill_value=-1)


def embed_pieces(ids: jax.Array, g: jax.Array, vocab: int) -> Piece:
    """An ``nn.Embed`` lookup: per-example gradient = scatter-add of g rows into the ids' rows.

    The norm sums each example's g rows over equal rows (found by sorting),
    never forming [B, vocab, d]; the weighted sum is one scatter-add into
    [vocab, d]. Both group the ids by :func:`embed_rows`, as the forward's
    scatter does: grouped any other way, an example's norm can be smaller than
    the term its scatter adds. Only for tables of two rows or more: Flax
    broadcasts a one-row table to every id.
    """
    b = ids.shape[0]
    read = embed_rows(ids.reshape(b, -1), vocab)
    ids = jnp.where(read >= 0, read, vocab)  # out of bounds: dropped by the scatter below, as by the forward's
    g2 = jnp.where((read >= 0)[..., None], as_f32(g).reshape(b, read.shape[1], -1), 0.0)
    order = jnp.argsort(ids, axis=1)
    sorted_ids = jnp.take_along_axis(ids, order, axis=1)
    new = jnp.concatenate([jnp.ones((b, 1), bool), sorted_ids[:, 1:] != sorted_ids[:, :-1]], axis=1)
    segment = jnp.cumsum(new, axis=1) - 1
    sums = jnp.zeros_like(g2).at[jnp.arange(b)[:, None], segment].add(jnp.take_along_axis(g2, order[..., None], 1))

    def weighted(w: jax.Array, keep: jax.Array) -> jax.Array:
        flat = (w[:, None, None] * rows(keep, g2)).reshape(-1, g2.shape[-1])
        return jnp.zeros((vocab, g2.shape[-1]), g2.dtype).at[ids.reshape(-1)].add(flat, mode="drop")

    return Piece(robust_norm(sums), weighted)


def embed_rule(own: Mapping[str, jax.Array], ids: jax.Array, g: jax.Array, k: int = 1) -> dict[str, Piece]:
    """``nn.Embed`` lookups of integer ids (one example per row; augmented copies are not grouped here)."""
    if k != 1:
        raise Unsupported("embedding lookups of augmented copies")
    return {"embedding": embed_pieces(ids, g, own["embedding"].shape[0])}


Rule = Callable[..., dict[str, Piece]]
# The closed-form rules. The tapped layers of dptune.models.layers record their inputs under these names;
# the intercepting path matches Flax modules to them. A parameter reports the name, "conv_ws" as "conv".
RULES: dict[str, Rule] = {
    "dense": dense_rule,
    "conv": conv_rule,
    "conv_ws": lambda own, a, g, k=1: conv_rule(own, a, g, k, standardized=True),
    "norm_affine": affine_rule,
    "embed": embed_rule,
}
