"""Fast per-example clipping for any Flax linen model: the clipped gradient sum from per-layer records.

Book-keeping (Bu et al. 2023, "Differentially Private Optimization on Large
Model at Small Cost") and ghost clipping (Li et al. 2022, "Large Language
Models Can Be Strong Differentially Private Learners") need, per parameterised
layer ``y = f(a; θ)``, each example's layer input ``aᵢ`` and output gradient
``gᵢ = ∂ℓᵢ/∂yᵢ``. :mod:`dptune.bookkeeping` gets them from dptune's own layers;
this module gets them from *any* Flax linen model, without changing it:

1. **One forward pass, intercepted.** ``flax.linen.intercept_methods`` sees
   every submodule method call. Calls of a module that owns parameters
   directly (its own leaves, not only its children's) record their inputs and
   get a zero *tap* added to their output; the calls such a module makes to
   its children record their outputs and get a zero tap added to their inputs.
   Each example is run alone (``jax.vmap`` over examples of a batch of one,
   exactly as the ``vmap`` reference runs it), so no example's records can
   depend on another example.
2. **One backward pass, to the taps only** (never to the parameters): the
   gradient at a tap is every example's gradient at that point at once.
3. **A rule per parameterised call** turns (input, output gradient) into each
   example's gradient norm and, for any weights w, the sum Σᵢ wᵢ·∇θℓᵢ:

   * ``dense`` — ``nn.Dense``, ``nn.DenseGeneral`` (``batch_dims=()``),
     :class:`dptune.layers.Dense`: flat inputs ‖aᵢ‖·‖gᵢ‖ and (w⊙a)ᵀg
     (:func:`dptune.bookkeeping.dense_rule`); inputs with token axes
     ([B, T, d]) take whichever is cheaper: the ghost norm from the T×T Gram
     matrices of a and g (B·T²·(d_in+d_out) operations) or aᵢᵀgᵢ formed
     (B·T·d_in·d_out); the sum is always one matmul over all B·T rows;
   * ``conv`` — :class:`dptune.layers.Conv` and ``nn.Conv`` of the same
     geometry (2-D, square kernel, one stride, SAME padding or a VALID one that
     pads nothing, no dilation or groups): :func:`dptune.bookkeeping.conv_rule`;
   * ``norm_affine`` — the scale/bias of ``nn.LayerNorm``, ``nn.RMSNorm``,
     ``nn.GroupNorm`` (features on the last axis) and
     :class:`dptune.layers.GroupNorm`, from x̂ and g;
   * ``embed`` — ``nn.Embed`` lookups: an example's gradient is the
     scatter-add of its g rows into its ids' rows; its norm comes from sums
     over each example's equal rows (a sort, no [B, vocab, d] tensor), the
     weighted sum from one scatter-add of B·T rows into [vocab, d], both with
     the ids normalised as ``jnp.take`` normalises them (:func:`embed_rows`);
     a one-row table (Flax broadcasts it to any id) or a custom
     ``promote_dtype`` takes ``layer_vjp``;
     ``Embed.attend`` (an output projection) alone is a dense rule;
   * ``layer_vjp`` — any other module: per-example gradients of its own
     parameters from *that module's* VJP on each example's recorded input,
     with its child calls replaced by their recorded outputs and seeded with
     the recorded gradients at their inputs (so the backward pass covers the
     module's own operations only, never the whole model);
   * ``tied`` — a module called more than once (shared weights, e.g. an
     ``nn.Embed`` also used through ``attend``): each call's per-example
     gradient by ``layer_vjp``, summed per example *before* the norm.

4. The clip weights ``wᵢ = min(1, C/‖∇ℓᵢ‖)`` from the global norms, then one
   weighted sum per parameter: no second backward pass.

Parameters that no intercepted call owns, or module calls inside a lifted
transform the model applies itself (``nn.scan``, ``nn.vmap``, ``nn.remat``:
their values cannot leave that transform), send the whole model to the
``vmap`` reference path, with the reason in :attr:`FastClip.reason`.

DP contract (tested against the ``vmap`` reference in
``tests/test_fastclip.py``): the result equals
:func:`dptune.dp_step.clipped_sum` of the per-example gradients within float
tolerance, with the same invariants as :func:`dptune.bookkeeping.clipped_sum`:
each kept example contributes norm ≤ C; padding (mask 0) and examples with a
non-finite gradient contribute exactly zero; norms are computed with
per-example rescaling, so huge finite gradients are clipped rather than
overflowing. The bound holds by construction, whatever the model: every
example's norm is the norm of exactly the term that enters the sum, computed
from that example's own records, in float32 (bf16 records are widened
first). A model that mixes examples (BatchNorm in training mode) would be
trained on a different function than the one clipped here;
:func:`check_per_example` detects it so that a study can refuse it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, cast

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.core.tracers import current_trace
from flax.linen.dtypes import promote_dtype as flax_promote_dtype

from dptune.errors import ConfigError
from dptune.models import layers
from dptune.trainer import bookkeeping
from dptune.trainer.bookkeeping import Piece, _materialised, _rows, as_f32, robust_norm
from dptune.trainer.dp_step import clipped_sum as reference_clipped_sum
from dptune.trainer.dp_step import global_l2_norms

PyTree = Any
LossFn = Callable[[jax.Array, jax.Array], jax.Array]
RULES: tuple[str, ...] = ("dense", "conv", "norm_affine", "embed", "layer_vjp", "tied", "vmap")
PATHS: tuple[str, ...] = ("auto", "vmap")


def cross_entropy(logits: jax.Array, label: jax.Array) -> jax.Array:
    """The default per-example loss: softmax cross-entropy of one example's logits and integer label."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, label)


@flax.struct.dataclass
class FastClip:
    """The clipped sum and what produced it.

    ``grads``: Σᵢ maskᵢ·min(1, C/‖∇ℓᵢ‖)·∇ℓᵢ, shaped like the parameters.
    ``norms``: each example's global gradient norm (NaN or ∞: non-finite, dropped).
    ``rules``: (parameter path, rule) for every parameter leaf, rule in :data:`RULES`.
    ``reason``: why the whole model took the ``vmap`` path; None on the fast path.
    """

    grads: PyTree
    norms: jax.Array
    rules: tuple[tuple[str, str], ...] = flax.struct.field(pytree_node=False)
    reason: str | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def rule_map(self) -> dict[str, str]:
        """``rules`` as a dict: parameter path ("Block_0/Dense_0/kernel") → rule."""
        return dict(self.rules)


class Unsupported(Exception):
    """The model cannot be intercepted completely; the caller uses the vmap path."""


# ----------------------------------------------------------------------------- pytrees of call arguments

_ARRAY = object()  # marks where an array leaf was in a call's (args, kwargs) or output


def _is_array(v: Any) -> bool:
    return isinstance(v, (jax.Array, np.ndarray))


def _inexact(v: Any) -> bool:
    return _is_array(v) and jnp.issubdtype(v.dtype, jnp.inexact)


def _split(tree: Any) -> tuple[list, list, Any]:
    """(array leaves, leaves with arrays replaced by a marker, treedef): arrays vary, the rest is static."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return [v for v in leaves if _is_array(v)], [_ARRAY if _is_array(v) else v for v in leaves], treedef


def _join(arrays: list, static: list, treedef: Any) -> Any:
    it = iter(arrays)
    return jax.tree_util.tree_unflatten(treedef, [next(it) if s is _ARRAY else s for s in static])


def _add_taps(tree: Any, taps: list) -> Any:
    """Add one zero tap to each floating-point array leaf, in flatten order."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    it = iter(taps)
    return jax.tree_util.tree_unflatten(treedef, [v + next(it) if _inexact(v) else v for v in leaves])


def _shapes(tree: Any) -> list[jax.ShapeDtypeStruct]:
    return [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in jax.tree_util.tree_leaves(tree) if _inexact(v)]


def _node(params: PyTree, path: tuple[str, ...]) -> Mapping | None:
    node = params
    for name in path:
        if not isinstance(node, Mapping) or name not in node:
            return None
        node = node[name]
    return node if isinstance(node, Mapping) else None


def _own_leaves(params: PyTree, path: tuple[str, ...]) -> dict[str, jax.Array]:
    """The parameters a module owns directly (not its children's)."""
    node = _node(params, path)
    return {} if node is None else {k: v for k, v in node.items() if not isinstance(v, Mapping)}


# ----------------------------------------------------------------------------- the intercepted forward pass

@dataclasses.dataclass
class _Call:
    """One method call of one module, as seen in the forward pass of one example."""

    index: int
    parent: int | None
    path: tuple[str, ...]
    method: str
    owns: bool                     # the module owns parameters directly
    module: nn.Module | None       # unbound copy (for calls that own parameters), re-run by layer_vjp
    in_static: list
    in_tree: Any
    in_shapes: list                # floating-point input leaves (taps on children's inputs)
    out_static: list
    out_tree: Any
    out_shapes: list               # floating-point output leaves (taps on outputs)
    children: list[int] = dataclasses.field(default_factory=list)


class _Recorder:
    """The interceptor of the forward pass: first it lists the calls (``plan`` None), then it taps them.

    Calls are identified by their order: the model's Python code runs the same
    way in both passes (a difference is detected and refused).
    """

    def __init__(self, params: PyTree, plan: list[_Call] | None = None, taps: dict | None = None):
        self.params = params
        self.plan = plan
        self.taps = taps
        self.calls: list[_Call] = []
        self.stack: list[tuple[tuple[str, ...], int]] = []
        self.count = 0
        self.inputs: dict[int, list] = {}
        self.outputs: dict[int, list] = {}

    def __call__(self, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if context.method_name == "setup":
            return next_fun(*args, **kwargs)
        path = tuple(context.module.path)
        if self.stack and self.stack[-1][0] == path:  # a module calling its own method: part of that call
            return next_fun(*args, **kwargs)
        k = self.count
        self.count += 1
        parent = self.stack[-1][1] if self.stack else None
        # A call inside a JAX transform the model itself applies (nn.scan, nn.vmap, nn.remat, …) runs under
        # another trace: values recorded there cannot leave it.
        if k == 0:
            self.trace = current_trace()
        elif current_trace() != self.trace:
            raise Unsupported(f"{'/'.join(path)}: called inside a lifted transform (nn.scan, nn.vmap, nn.remat, …), "
                              "whose values cannot be recorded")
        if self.plan is None:
            owns = bool(_own_leaves(self.params, path))
            _, in_static, in_tree = _split((args, kwargs))
            call = _Call(k, parent, path, context.method_name, owns,
                         context.module.clone(_deep_clone=True, _reset_names=True, name=None) if owns else None,
                         in_static, in_tree, _shapes((args, kwargs)), [], None, [])
            self.calls.append(call)
            if parent is not None:
                self.calls[parent].children.append(k)
        else:
            planned = self.plan[k] if k < len(self.plan) else None
            if planned is None or planned.path != path or planned.method != context.method_name:
                raise Unsupported(f"{'/'.join(path) or 'top module'}: calls differ between two traces of the model")
            call = planned
            assert self.taps is not None  # a second trace always has its taps
            if k in self.taps["in"]:
                args, kwargs = _add_taps((args, kwargs), self.taps["in"][k])
            if call.owns:
                self.inputs[k] = _split((args, kwargs))[0]
        self.stack.append((path, k))
        try:
            out = next_fun(*args, **kwargs)
        finally:
            self.stack.pop()
        if self.plan is None:
            _, call.out_static, call.out_tree = _split(out)
            call.out_shapes = _shapes(out)
        else:
            assert self.taps is not None
            if k in self.taps["out"]:
                out = _add_taps(out, self.taps["out"][k])
            if k in self.taps["in"]:
                self.outputs[k] = _split(out)[0]
        return out


def _example_loss(model: nn.Module, params: PyTree, loss_fn: LossFn, recorder: _Recorder, xi: jax.Array,
                  yi: jax.Array) -> jax.Array:
    with nn.intercept_methods(recorder):
        logits = model.apply({"params": params}, xi[None])
    return loss_fn(logits[0], yi)


def _scan(model: nn.Module, params: PyTree, x: jax.Array, y: jax.Array, loss_fn: LossFn) -> list[_Call]:
    """The calls of one example's forward pass (traced abstractly; nothing runs)."""
    recorder = _Recorder(params)
    jax.eval_shape(lambda xi, yi: _example_loss(model, params, loss_fn, recorder, xi, yi),
                   jax.ShapeDtypeStruct(x.shape[1:], x.dtype), jax.ShapeDtypeStruct(y.shape[1:], y.dtype))
    if not recorder.calls:
        raise Unsupported("no module call was intercepted")
    return recorder.calls


def _coverage(params: PyTree, calls: list[_Call]) -> None:
    owned = {c.path + (name,) for c in calls if c.owns for name in _own_leaves(params, c.path)}
    leaves = [tuple(str(getattr(k, "key", k)) for k in kp) for kp, _ in jax.tree_util.tree_leaves_with_path(params)]
    missing = [leaf for leaf in leaves if leaf not in owned]
    if missing:
        names = ", ".join("/".join(m) for m in missing[:3]) + (" …" if len(missing) > 3 else "")
        raise Unsupported(f"parameters {names} are not used by any intercepted module call")


# ----------------------------------------------------------------------------- rules

def _reshaped(piece: Piece, shape: tuple[int, ...], transpose: bool = False) -> Piece:
    def weighted(w: jax.Array, keep: jax.Array) -> jax.Array:
        s = piece.weighted(w, keep)
        return (s.T if transpose else s).reshape(shape)
    return Piece(piece.norms, weighted)


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
    """Whether a dense layer's norms come from Gram matrices: never, for now.

    Gram matrices would cost less (T²·(d_in+d_out) per example against T·d_in·d_out) when T is small,
    but in float32 their norm of an example whose tokens nearly cancel is rounding error, smaller than
    the term the separately computed sum holds for it: a crafted example then moved the clipped sum by
    up to 1.96·C (review of issue #17). Forming aᵢᵀgᵢ takes the norm and the sum from the same numbers.
    """
    del tokens, d_in, d_out
    return False


def dense_pieces(params: Mapping, a: jax.Array, g: jax.Array) -> dict[str, Piece]:
    """``y = a·W (+ b)`` on the last axis; a [B, …, d_in], g [B, …, d_out].

    An example's gradient sums over its positions."""
    b, d_in, d_out = a.shape[0], a.shape[-1], g.shape[-1]
    a3, g3 = as_f32(a).reshape(b, -1, d_in), as_f32(g).reshape(b, -1, d_out)
    if not dense_uses_ghost(a3.shape[1], d_in, d_out):
        return bookkeeping.dense_rule(params, a3, g3)
    pieces = {"kernel": Piece(
        ghost_dense_norms(a3, g3),
        lambda w, keep: jnp.einsum("bti,bto->io", w[:, None, None] * _rows(keep, a3), _rows(keep, g3)))}
    if "bias" in params:
        pieces["bias"] = _materialised(g3.sum(axis=1))
    return pieces


def _dense_general(m: nn.DenseGeneral, own: Mapping, a: jax.Array, g: jax.Array) -> dict[str, Piece]:
    n = a.ndim - 1  # one example's rank
    axes = [ax % n for ax in ((m.axis,) if isinstance(m.axis, int) else tuple(m.axis))]
    moved = jnp.moveaxis(a, [1 + ax for ax in axes], list(range(a.ndim - len(axes), a.ndim)))
    d_in = int(np.prod([a.shape[1 + ax] for ax in axes]))
    d_out = int(np.prod(own["kernel"].shape)) // d_in
    pieces = dense_pieces(own, moved.reshape(a.shape[0], -1, d_in), g.reshape(g.shape[0], -1, d_out))
    return {name: _reshaped(p, own[name].shape) for name, p in pieces.items()}


def _conv_geometry_ok(m: nn.Conv, own: Mapping, a_shape: tuple, g_shape: tuple) -> bool:
    kernel = own["kernel"].shape
    if len(kernel) != 4 or kernel[0] != kernel[1] or m.feature_group_count != 1 or m.mask is not None:
        return False
    if m.conv_general_dilated is not None or m.conv_general_dilated_cls is not None:
        return False
    for d in (m.input_dilation, m.kernel_dilation):
        if d not in (None, 1) and tuple(np.broadcast_to(d, 2)) != (1, 1):
            return False
    s = set(np.broadcast_to(1 if m.strides is None else m.strides, 2).tolist())
    if len(s) != 1 or not isinstance(m.padding, str) or m.padding not in ("SAME", "VALID"):
        return False
    (stride,), h, w, ho, wo = s, a_shape[1], a_shape[2], g_shape[1], g_shape[2]
    if (ho, wo) != (-(-h // stride), -(-w // stride)):
        return False
    return m.padding == "SAME" or layers.same_padding((h, w), (ho, wo), kernel[0], stride) == [(0, 0), (0, 0)]


def _images(a: jax.Array) -> tuple[jax.Array, int]:
    """Per-example [B, …, H, W, C] → [B·n, H, W, C] and n (the rows per example)."""
    rows = a.reshape(-1, *a.shape[-3:])
    return rows, rows.shape[0] // a.shape[0]


def _affine(x_hat: jax.Array, g: jax.Array, own: Mapping) -> dict[str, Piece]:
    axes = tuple(range(1, g.ndim - 1))
    x_hat, g = as_f32(x_hat), as_f32(g)
    pieces = {}
    if "scale" in own:
        pieces["scale"] = _materialised((x_hat * g).sum(axis=axes))
    if "bias" in own:
        pieces["bias"] = _materialised(g.sum(axis=axes))
    return pieces


def embed_rows(ids: jax.Array, vocab: int) -> jax.Array:
    """The table row each id reads in ``jnp.take(table, ids, axis=0)`` (the lookup of ``nn.Embed``); −1 for none.

    Asked of ``jnp.take`` itself, so that the ids are normalised exactly as in
    the forward pass and its VJP: ids in [−vocab, 0) wrap once; any other id
    outside [0, vocab) reads a NaN row forward and its gradient is dropped by
    the VJP's scatter (jax 0.10's default "fill" mode, checked in the tests).
    """
    return jnp.take(jnp.arange(vocab), ids, axis=0, fill_value=-1)


def embed_pieces(ids: jax.Array, g: jax.Array, vocab: int) -> Piece:
    """An ``nn.Embed`` lookup: per-example gradient = scatter-add of g rows into the ids' rows.

    The norm sums each example's g rows over equal rows (found by sorting),
    so only [B, T, d] is formed, never [B, vocab, d]; the weighted sum is one
    scatter-add into [vocab, d]. Both group the ids by :func:`embed_rows`, as
    the forward's scatter does, and give the ids it drops exactly zero weight:
    grouped any other way, an example's norm can be smaller than the term
    its scatter adds (ids wrapped once in the norm and twice in the sum did).
    Only for tables of two rows or more: Flax broadcasts a one-row table to
    every id, in range or not.
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
        rows = (w[:, None, None] * _rows(keep, g2)).reshape(-1, g2.shape[-1])
        return jnp.zeros((vocab, g2.shape[-1]), g2.dtype).at[ids.reshape(-1)].add(rows, mode="drop")

    return Piece(robust_norm(sums), weighted)


def _closed_form(call: _Call, own: Mapping, inputs: list, g: list, children_out: list[list]) -> tuple[str, dict] | None:
    """(rule, pieces) for a known layer called once, or None (then layer_vjp)."""
    m, names = call.module, set(own)
    assert m is not None  # only calls that own parameters reach a rule
    kind = type(m)
    if len(inputs) != 1 or len(g) != 1:
        return None
    a, gy = inputs[0], g[0]
    # A custom dot_general (e.g. quantised) is not the plain matmul the dense rule differentiates.
    plain = getattr(m, "dot_general", None) is None and getattr(m, "dot_general_cls", None) is None
    if call.method == "__call__" and not call.children and plain:
        if kind in (nn.Dense, layers.Dense) and "kernel" in names <= {"kernel", "bias"} and own["kernel"].ndim == 2:
            return "dense", dense_pieces(own, a, gy)
        # One contracted axis, the last: Flax reorders several axes, which the rule would not (review of #17).
        if (kind is nn.DenseGeneral and not m.batch_dims and m.axis in (-1, (-1,))
                and "kernel" in names <= {"kernel", "bias"}):
            return "dense", _dense_general(cast(nn.DenseGeneral, m), own, a, gy)
        if kind in (nn.Conv, layers.Conv) and a.ndim >= 4 and gy.ndim == a.ndim:
            rows, n = _images(a)
            g_rows = gy.reshape(-1, *gy.shape[-3:])
            if kind is layers.Conv:
                return "conv", bookkeeping.conv_rule(own, rows, g_rows, n, standardized=m.weight_standardization)
            if "kernel" in names <= {"kernel", "bias"} and _conv_geometry_ok(cast(nn.Conv, m), own, rows.shape,
                                                                             g_rows.shape):
                return "conv", bookkeeping.conv_rule(own, rows, g_rows, n)
        if kind in (nn.LayerNorm, nn.RMSNorm) and m.feature_axes in (-1, (-1,)) \
                and own.get("scale", own.get("bias")).shape == a.shape[-1:]:
            updates = {"use_scale": False} | ({"use_bias": False} if kind is nn.LayerNorm else {})
            normalize = m.clone(parent=None, **updates)
            x_hat = jax.vmap(lambda ai: normalize.apply({}, ai))(a)
            return "norm_affine", _affine(cast(jax.Array, x_hat), gy, own)
        if kind is nn.GroupNorm and own.get("scale", own.get("bias")).shape == a.shape[-1:]:
            normalize = m.clone(parent=None, use_scale=False, use_bias=False)
            x_hat = jax.vmap(lambda ai: normalize.apply({}, ai))(a)
            return "norm_affine", _affine(cast(jax.Array, x_hat), gy, own)
        if kind is nn.Embed and names == {"embedding"} and jnp.issubdtype(a.dtype, jnp.integer) \
                and own["embedding"].shape[0] > 1 and m.promote_dtype is flax_promote_dtype:
            return "embed", {"embedding": embed_pieces(a, gy, own["embedding"].shape[0])}
    if (kind is layers.GroupNorm and call.method == "__call__" and len(call.children) == 1
            and len(children_out[0]) == 1 and names == {"scale", "bias"}):
        return "norm_affine", bookkeeping.affine_rule(own, children_out[0][0], gy)
    if (kind is nn.Embed and call.method == "attend" and names == {"embedding"} and not call.children
            and m.promote_dtype is flax_promote_dtype):
        kernel = own["embedding"].T
        piece = dense_pieces({"kernel": kernel}, a, gy)["kernel"]
        return "embed", {"embedding": _reshaped(piece, own["embedding"].shape, transpose=True)}
    return None


class _Stub:
    """Interceptor for re-running one module alone: its child calls return their recorded outputs.

    The floating-point inputs it passes to each child are collected, so that
    the VJP can be seeded with the recorded gradients there.
    """

    def __init__(self, children: list[_Call], outputs: list[list]):
        self.children, self.outputs = children, outputs
        self.seen: list[list] = []

    def __call__(self, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if context.method_name == "setup" or tuple(context.module.path) == ():
            return next_fun(*args, **kwargs)
        j = len(self.seen)
        if j >= len(self.children) or context.method_name != self.children[j].method:
            raise Unsupported(f"{context.module.path}: the module's child calls differ when it is run alone")
        child = self.children[j]
        self.seen.append([v for v in jax.tree_util.tree_leaves((args, kwargs)) if _inexact(v)])
        return _join(self.outputs[j], child.out_static, child.out_tree)


def layer_vjp(call: _Call, calls: list[_Call], node: Mapping, own: Mapping, inputs: list, g_out: list,
              child_outputs: list[list], child_grads: list[list]) -> dict[str, jax.Array]:
    """Per-example gradients [B, …] of one call's own parameters from that module's VJP alone.

    Per example: the module's method is run on the recorded inputs with its
    child calls replaced by their recorded outputs; the VJP w.r.t. its own
    parameters is seeded with the output gradient and the gradients recorded
    at its children's inputs. By the chain rule this is the example's full
    gradient of those parameters: every path from them to the loss leaves the
    module through its output or through a child's input.
    """
    module = call.module
    assert module is not None  # only calls that own parameters are differentiated
    children = [calls[c] for c in call.children]
    method = None if call.method == "__call__" else call.method

    def run(own_values: dict, in_arrays: list, child_out: list[list]) -> tuple[list, list]:
        args, kwargs = _join(in_arrays, call.in_static, call.in_tree)
        stub = _Stub(children, child_out)
        with nn.intercept_methods(stub):
            out = module.apply({"params": {**node, **own_values}}, *args, method=method, **kwargs)
        if len(stub.seen) != len(children):
            raise Unsupported(f"{'/'.join(call.path)}: the module's child calls differ when it is run alone")
        return [v for v in jax.tree_util.tree_leaves(out) if _inexact(v)], stub.seen

    def one(in_arrays: list, child_out: list[list], gy: list, gu: list[list]) -> dict:
        _, vjp = jax.vjp(lambda o: run(o, in_arrays, child_out), dict(own))
        return vjp((gy, gu))[0]

    return jax.vmap(one)(inputs, child_outputs, g_out, child_grads)


# ----------------------------------------------------------------------------- the clipped sum

def _varying_axes(v: Any) -> frozenset:
    kind = getattr(jax.typeof(v), "manual_axis_type", None)
    return frozenset() if kind is None else frozenset(kind.varying)


def device_varying(tree: PyTree, axes: frozenset | set) -> PyTree:
    """Inside ``shard_map``: cast each leaf to varying over ``axes`` (those it is not varying over yet).

    A gradient with respect to a device-invariant value is summed over the
    devices; per-example quantities must stay on their example's device, or
    one device's examples would enter another's norms.
    """
    def one(v: jax.Array) -> jax.Array:
        missing = tuple(sorted(set(axes) - _varying_axes(v)))
        return jax.lax.pcast(v, missing, to="varying") if missing else v
    return jax.tree_util.tree_map(one, tree)


def _keystr(path: tuple[str, ...]) -> str:
    return "/".join(path)


def _vmap_path(model: nn.Module, params: PyTree, x: jax.Array, y: jax.Array, mask: jax.Array,
               clip_norm: jax.Array | float, loss_fn: LossFn, reason: str) -> FastClip:
    def loss(p: PyTree, xi: jax.Array, yi: jax.Array) -> jax.Array:
        return loss_fn(model.apply({"params": p}, xi[None])[0], yi)

    per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x, y)
    rules = tuple((jax.tree_util.keystr(kp, simple=True, separator="/"), "vmap")
                  for kp, _ in jax.tree_util.tree_leaves_with_path(params))
    return FastClip(reference_clipped_sum(per_example, mask, clip_norm), global_l2_norms(per_example), rules, reason)


def _pieces(model: nn.Module, params: PyTree, x: jax.Array, y: jax.Array, loss_fn: LossFn,
            axes: frozenset) -> tuple[dict[tuple[str, ...], Piece], dict[tuple[str, ...], str]]:
    calls = _scan(model, params, x, y, loss_fn)
    _coverage(params, calls)
    owners = [c for c in calls if c.owns]
    stubbed = {k for c in owners for k in c.children}
    taps = {"out": {c.index: [jnp.zeros(s.shape, s.dtype) for s in c.out_shapes] for c in owners},
            "in": {k: [jnp.zeros(s.shape, s.dtype) for s in calls[k].in_shapes] for k in stubbed}}
    taps = device_varying(taps, axes)

    def tapped(t: dict, xi: jax.Array, yi: jax.Array) -> tuple[jax.Array, tuple[dict, dict]]:
        recorder = _Recorder(params, calls, t)
        loss = _example_loss(model, params, loss_fn, recorder, xi, yi)
        return loss, (recorder.inputs, recorder.outputs)

    # Examples never meet: each runs alone, so ∂ℓᵢ/∂(tap) is example i's gradient there.
    grads, (inputs, outputs) = jax.vmap(jax.grad(tapped, has_aux=True), in_axes=(None, 0, 0))(taps, x, y)

    by_path: dict[tuple[str, ...], list[_Call]] = {}
    for c in owners:
        by_path.setdefault(c.path, []).append(c)
    pieces: dict[tuple[str, ...], Piece] = {}
    rules: dict[tuple[str, ...], str] = {}
    for path, group in by_path.items():
        node = _node(params, path)
        assert node is not None  # every recorded call's scope is in the parameters
        own = _own_leaves(params, path)
        found = None
        if len(group) == 1:
            c = group[0]
            found = _closed_form(c, own, inputs[c.index], grads["out"][c.index],
                                 [outputs[k] for k in c.children])
        if found is not None and set(found[1]) == set(own):
            rule, layer_pieces = found
        else:
            total = None
            for c in group:
                per_example = layer_vjp(c, calls, node, own, inputs[c.index], grads["out"][c.index],
                                        [outputs[k] for k in c.children], [grads["in"][k] for k in c.children])
                total = per_example if total is None else jax.tree_util.tree_map(jnp.add, total, per_example)
            rule = "layer_vjp" if len(group) == 1 else "tied"
            assert total is not None  # a group has at least one call
            layer_pieces = {name: _materialised(v) for name, v in total.items()}
        for name, piece in layer_pieces.items():
            pieces[path + (name,)] = piece
            rules[path + (name,)] = rule
    return pieces, rules


def clipped_sum(model: nn.Module, params: PyTree, x: jax.Array, y: jax.Array, mask: jax.Array,
                clip_norm: jax.Array | float, loss_fn: LossFn | None = None, path: str = "auto") -> FastClip:
    """Σᵢ maskᵢ · min(1, C/‖∇ℓᵢ‖) · ∇ℓᵢ for any Flax linen model, by per-layer rules (module docstring).

    DP guarantee: each example with mask 1 and a finite gradient contributes a
    term of L2 norm ≤ C (over all parameters together); padding and
    non-finite examples contribute exactly zero; so adding or removing one
    example changes the result by at most C. Huge finite gradients are
    clipped, not overflowed. Same contract as
    :func:`dptune.dp_step.clipped_sum` of the ``vmap`` per-example gradients,
    which it equals within float tolerance.

    Args:
        model: a Flax linen module applied as ``model.apply({"params": params}, x)``;
            deterministic (no dropout RNG, no mutable collections).
        params: its parameters.
        x: a batch of inputs [B, …] (any dtype, e.g. floats or token ids).
        y: the labels [B, …] passed to ``loss_fn``.
        mask: [B]; rows with 0 are padding.
        clip_norm: C (may be traced; ∞ clips nothing).
        loss_fn: one example's loss ``loss_fn(logits_i, y_i)`` (a scalar);
            default :func:`cross_entropy` with integer labels.
        path: "auto" (fast rules; the ``vmap`` reference when the model cannot
            be intercepted completely) or "vmap" (always the reference).

    Returns:
        :class:`FastClip`: the clipped sum, each example's norm, the rule of
        every parameter leaf and, on the ``vmap`` path, why. Inside
        ``shard_map`` with ``x`` split over a mesh axis, the sum is this
        device's share (the caller sums it over the axis); parameters and taps
        are made device-varying here, so no example's gradient leaves its device.

    Raises:
        ConfigError: ``path`` is not one of :data:`PATHS`.
    """
    if path not in PATHS:
        raise ConfigError("clipping", f"unknown {path!r}; allowed: {', '.join(PATHS)}")
    loss_fn = loss_fn or cross_entropy
    # Inside shard_map, parameters and taps vary over the mesh axes the batch varies over, so that
    # no per-example quantity is summed across devices; the caller sums the returned grads.
    axes = _varying_axes(x)
    params = device_varying(params, axes)
    if path == "vmap":
        return _vmap_path(model, params, x, y, mask, clip_norm, loss_fn, "requested")
    try:
        pieces, rules = _pieces(model, params, x, y, loss_fn, axes)
    except Unsupported as e:
        return _vmap_path(model, params, x, y, mask, clip_norm, loss_fn, str(e))
    norms = bookkeeping.global_norms(pieces)
    keep = (mask > 0) & jnp.isfinite(norms)
    tiny = jnp.finfo(norms.dtype).tiny
    w = jnp.where(keep, jnp.minimum(1.0, clip_norm / jnp.maximum(norms, tiny)), 0.0)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = [tuple(str(getattr(k, "key", k)) for k in kp) for kp, _ in leaves]
    grads = jax.tree_util.tree_unflatten(treedef, [pieces[k].weighted(w, keep) for k in keys])
    return FastClip(grads, norms, tuple((_keystr(k), rules[k]) for k in keys), None)


def plan(model: nn.Module, params: PyTree, x: jax.Array, y: jax.Array,
         loss_fn: LossFn | None = None) -> tuple[dict[str, str], str | None]:
    """Which rule each parameter takes, and why the model falls back to ``vmap`` (None if it does not).

    Traced abstractly: nothing is computed, so it is cheap to call before a trial.

    Args:
        model, params, x, y, loss_fn: as for :func:`clipped_sum` (x and y may be a small batch).

    Returns:
        (parameter path → rule, fallback reason or None).
    """
    out = jax.eval_shape(lambda p, xx, yy: clipped_sum(model, p, xx, yy, jnp.ones(xx.shape[0]), 1.0, loss_fn),
                         params, x, y)
    return out.rule_map, out.reason


# ----------------------------------------------------------------------------- per-example independence

def mixing_reason(model: nn.Module, variables: PyTree, x: Any, seed: int = 0, trials: int = 2,
                  rtol: float = 1e-4) -> str | None:
    """Why ``model`` is not per-example (None if the tests pass), on one batch of inputs.

    Four tests: the output has one row per example; for float inputs, the
    gradient of one example's output with respect to every *other* example's
    input is exactly zero (autodiff gives structural zeros for a model that does
    not mix, so mixing at any scale shows); changing one example's input (random
    noise for floats, random ids for integers) changes no other row's output
    (integer inputs: not by a single bit); and each example's output equals the
    model applied to that example alone. A model may behave differently at other
    batch sizes: callers check at the sizes training runs
    (:func:`dptune.trainer.run.check_model`). Only the verdict should leave the
    caller: pass public or synthetic inputs where the verdict itself must not
    depend on private data.

    Args:
        model: the Flax module.
        variables: all its variables (``{"params": …, "batch_stats": …}``); the
            model is applied with every collection mutable, as in training.
        x: a batch of at least 2 inputs.
        seed: seeds the perturbations (a public seed: the check is about the model).
        trials: how many single examples are perturbed.
        rtol: tolerance relative to the largest output.

    Returns:
        A one-line reason, or None.
    """
    x = np.asarray(x)
    b = x.shape[0]
    if b < 2:
        raise ConfigError("model", "the per-example check needs a batch of at least 2 inputs")

    apply = jax.jit(lambda v, batch: model.apply(v, batch, mutable=True)[0])

    def run(batch: np.ndarray) -> np.ndarray | None:
        out = apply(variables, jnp.asarray(batch))
        leaves = jax.tree_util.tree_leaves(out)
        if not leaves or not all(v.ndim >= 1 and v.shape[0] == batch.shape[0] for v in leaves):
            return None
        return np.concatenate([np.asarray(v, np.float64).reshape(v.shape[0], -1) for v in leaves], axis=1)

    out = run(x)
    if out is None:
        return f"the model's output does not have one row per example (batch {b})"
    rng = np.random.default_rng(seed)
    if not np.issubdtype(x.dtype, np.integer):
        for i in sorted({0, b - 1, int(rng.integers(b))}):
            j = _cross_gradient(model, variables, x, i)
            if j is not None:
                return (f"output row {i} depends on example {j}'s input (a nonzero gradient): the model mixes "
                        f"examples at batch {b} (e.g. BatchNorm in training mode), which breaks per-example "
                        "sensitivity")
    tol = rtol * (1.0 + np.max(np.abs(out)))
    # Same shapes, same program: a row of a model that does not mix cannot move by a bit. (Floats were
    # checked exactly by the gradient above; here the tolerance only spares a rounding of their own.)
    same_shape_tol = 0.0 if np.issubdtype(x.dtype, np.integer) else tol
    for _ in range(trials):
        j = int(rng.integers(b))
        changed = x.copy()
        if np.issubdtype(x.dtype, np.integer):
            changed[j] = rng.integers(x.min(), x.max() + 1, size=x.shape[1:])
        else:
            changed[j] = x[j] + rng.standard_normal(x.shape[1:]) * (1.0 + np.std(x))
        moved = np.max(np.abs(run(changed) - out), axis=1)
        moved[j] = 0.0
        if np.max(moved) > same_shape_tol:
            i = int(np.argmax(moved))
            return (f"output row {i} changes when only example {j} changes: the model mixes examples "
                    "(e.g. BatchNorm in training mode), which breaks per-example sensitivity")
    for i in (0, b - 1):
        alone = run(x[i:i + 1])
        if alone is None or np.max(np.abs(alone - out[i:i + 1])) > tol:
            return (f"example {i}'s output differs when it is run alone: the model depends on the batch "
                    "(e.g. BatchNorm in training mode), which breaks per-example sensitivity")
    return None


def _cross_gradient(model: nn.Module, variables: PyTree, x: np.ndarray, i: int) -> int | None:
    """An example j ≠ i whose input moves output row ``i`` (a nonzero gradient), or None."""
    def row(batch: jax.Array) -> jax.Array:
        out = model.apply(variables, batch, mutable=True)[0]
        return jnp.sum(jnp.stack([jnp.sum(leaf[i].astype(jnp.float32)) for leaf in jax.tree_util.tree_leaves(out)]))

    grad = np.asarray(jax.jit(jax.grad(row))(jnp.asarray(x)), np.float64).reshape(x.shape[0], -1)
    reach = np.abs(np.nan_to_num(grad, nan=1.0)).max(axis=1)
    reach[i] = 0.0
    return int(np.argmax(reach)) if reach.max() > 0 else None


def check_per_example(model: nn.Module, variables: PyTree, x: Any, seed: int = 0) -> None:
    """Refuse a model whose output rows depend on other examples (for ``study create``).

    Args:
        model, variables, x, seed: as for :func:`mixing_reason`.

    Raises:
        ConfigError: field ``model``, with the one-line reason.
    """
    reason = mixing_reason(model, variables, x, seed)
    if reason is not None:
        raise ConfigError("model", reason)
