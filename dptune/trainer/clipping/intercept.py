"""Per-layer records of *any* Flax linen model, for the rules of :mod:`dptune.trainer.clipping.rules`.

Book-keeping (Bu et al. 2023) and ghost clipping (Li et al. 2022) need, per
parameterised layer ``y = f(a; θ)``, each example's layer input ``aᵢ`` and
output gradient ``gᵢ = ∂ℓᵢ/∂yᵢ``. This module gets them without changing the
model:

1. **One forward pass, intercepted.** ``flax.linen.intercept_methods`` sees
   every submodule method call. Calls of a module that owns parameters
   directly record their inputs and get a zero *tap* added to their output;
   the calls such a module makes to its children record their outputs and
   get a zero tap added to their inputs. Each example is run alone
   (``jax.vmap`` over batches of one, exactly as the vmap reference runs it),
   so no example's records can depend on another example's.
2. **One backward pass, to the taps only**: the gradient at a tap is every
   example's gradient at that point at once.
3. **A rule per parameterised call**: a closed form of the registry where the
   module is a known layer (``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv``,
   ``nn.LayerNorm``/``RMSNorm``/``GroupNorm``, ``nn.Embed`` and its
   ``attend``, dptune's tapped layers); else ``layer_vjp``: per-example
   gradients of the module's own parameters from *that module's* VJP on the
   recorded input, its child calls replaced by their recorded outputs and
   seeded with the recorded gradients at their inputs; ``tied`` for a module
   called more than once (each call by ``layer_vjp``, summed per example
   before the norm).

Parameters that no intercepted call owns, or calls inside a lifted transform
the model applies itself (``nn.scan``, ``nn.vmap``, ``nn.remat``), raise
:class:`Unsupported` with the reason. Every norm is that of exactly the term
that enters the sum, from that example's own records, in float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core.tracers import current_trace
from flax.linen.dtypes import promote_dtype as flax_promote_dtype

from dptune.models import layers
from dptune.trainer.clipping.rules import (
    Piece,
    Unsupported,
    affine_rule,
    conv_rule,
    dense_rule,
    embed_pieces,
    materialised,
    reshaped,
)

PyTree = Any
LossFn = Callable[[jax.Array, jax.Array], jax.Array]
Pieces = dict[tuple[str, ...], Piece]

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
            call = self._listed(k, parent, path, context, args, kwargs)
        else:
            call, args, kwargs = self._tapped_inputs(k, path, context.method_name, args, kwargs)
        self.stack.append((path, k))
        try:
            out = next_fun(*args, **kwargs)
        finally:
            self.stack.pop()
        return self._output(call, out)

    def _listed(self, k: int, parent: int | None, path: tuple[str, ...], context: Any, args: tuple,
                kwargs: dict) -> _Call:
        """First trace: the call joins the plan."""
        owns = bool(_own_leaves(self.params, path))
        _, in_static, in_tree = _split((args, kwargs))
        call = _Call(k, parent, path, context.method_name, owns,
                     context.module.clone(_deep_clone=True, _reset_names=True, name=None) if owns else None,
                     in_static, in_tree, _shapes((args, kwargs)), [], None, [])
        self.calls.append(call)
        if parent is not None:
            self.calls[parent].children.append(k)
        return call

    def _tapped_inputs(self, k: int, path: tuple[str, ...], method: str, args: tuple,
                       kwargs: dict) -> tuple[_Call, tuple, dict]:
        """Second trace: the planned call, its inputs with their taps added (and recorded if it owns parameters)."""
        planned = self.plan[k] if self.plan is not None and k < len(self.plan) else None
        if planned is None or planned.path != path or planned.method != method:
            raise Unsupported(f"{'/'.join(path) or 'top module'}: calls differ between two traces of the model")
        assert self.taps is not None  # a second trace always has its taps
        if k in self.taps["in"]:
            args, kwargs = _add_taps((args, kwargs), self.taps["in"][k])
        if planned.owns:
            self.inputs[k] = _split((args, kwargs))[0]
        return planned, args, kwargs

    def _output(self, call: _Call, out: Any) -> Any:
        """First trace: the output's structure joins the plan; second: its taps are added and it is recorded."""
        if self.plan is None:
            _, call.out_static, call.out_tree = _split(out)
            call.out_shapes = _shapes(out)
            return out
        assert self.taps is not None
        if call.index in self.taps["out"]:
            out = _add_taps(out, self.taps["out"][call.index])
        if call.index in self.taps["in"]:
            self.outputs[call.index] = _split(out)[0]
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


def varying_axes(v: Any) -> frozenset:
    """The mesh axes ``v`` varies over inside ``shard_map`` (empty outside)."""
    kind = getattr(jax.typeof(v), "manual_axis_type", None)
    return frozenset() if kind is None else frozenset(kind.varying)


def device_varying(tree: PyTree, axes: frozenset | set) -> PyTree:
    """Inside ``shard_map``: cast each leaf to varying over ``axes`` (those it is not varying over yet).

    A gradient with respect to a device-invariant value is summed over the
    devices; per-example quantities must stay on their example's device, or
    one device's examples would enter another's norms.
    """
    def one(v: jax.Array) -> jax.Array:
        missing = tuple(sorted(set(axes) - varying_axes(v)))
        return jax.lax.pcast(v, missing, to="varying") if missing else v
    return jax.tree_util.tree_map(one, tree)


def _dense_general(m: nn.DenseGeneral, own: Mapping, a: jax.Array, g: jax.Array) -> dict[str, Piece]:
    n = a.ndim - 1  # one example's rank
    axes = [ax % n for ax in ((m.axis,) if isinstance(m.axis, int) else tuple(m.axis))]
    moved = jnp.moveaxis(a, [1 + ax for ax in axes], list(range(a.ndim - len(axes), a.ndim)))
    d_in = int(np.prod([a.shape[1 + ax] for ax in axes]))
    d_out = int(np.prod(own["kernel"].shape)) // d_in
    pieces = dense_rule(own, moved.reshape(a.shape[0], -1, d_in), g.reshape(g.shape[0], -1, d_out))
    return {name: reshaped(p, own[name].shape) for name, p in pieces.items()}


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


def _norm_x_hat(call: _Call, own: Mapping, a: jax.Array) -> jax.Array | None:
    """x̂ of a Flax normalisation layer with its affine part on the last axis, recomputed per example; else None."""
    m: Any = call.module
    kind = type(m)
    if own.get("scale", own.get("bias")).shape != a.shape[-1:]:
        return None
    if kind in (nn.LayerNorm, nn.RMSNorm) and m.feature_axes in (-1, (-1,)):
        updates = {"use_scale": False} | ({"use_bias": False} if kind is nn.LayerNorm else {})
    elif kind is nn.GroupNorm:
        updates = {"use_scale": False, "use_bias": False}
    else:
        return None
    normalize = m.clone(parent=None, **updates)
    return cast(jax.Array, jax.vmap(lambda ai: normalize.apply({}, ai))(a))


def _leaf_call_rule(call: _Call, own: Mapping, a: jax.Array, gy: jax.Array) -> tuple[str, dict] | None:
    """The registry rule of a childless ``__call__`` of a known Flax layer, or None."""
    m: Any = call.module
    names, kind = set(own), type(m)
    if kind in (nn.Dense, layers.Dense) and "kernel" in names <= {"kernel", "bias"} and own["kernel"].ndim == 2:
        return "dense", dense_rule(own, a, gy)
    # One contracted axis, the last: Flax reorders several axes, which the rule would not.
    if (kind is nn.DenseGeneral and not m.batch_dims and m.axis in (-1, (-1,))
            and "kernel" in names <= {"kernel", "bias"}):
        return "dense", _dense_general(cast(nn.DenseGeneral, m), own, a, gy)
    if kind in (nn.Conv, layers.Conv) and a.ndim >= 4 and gy.ndim == a.ndim:
        images, n = _images(a)
        g_images = gy.reshape(-1, *gy.shape[-3:])
        if kind is layers.Conv:
            ws = m.weight_standardization
            return "conv", conv_rule(own, images, g_images, n, standardized=ws)
        if "kernel" in names <= {"kernel", "bias"} and _conv_geometry_ok(cast(nn.Conv, m), own, images.shape,
                                                                         g_images.shape):
            return "conv", conv_rule(own, images, g_images, n)
    if kind in (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm) and (x_hat := _norm_x_hat(call, own, a)) is not None:
        return "norm_affine", affine_rule(own, x_hat, gy)
    if kind is nn.Embed and names == {"embedding"} and jnp.issubdtype(a.dtype, jnp.integer) \
            and own["embedding"].shape[0] > 1 and m.promote_dtype is flax_promote_dtype:
        return "embed", {"embedding": embed_pieces(a, gy, own["embedding"].shape[0])}
    return None


def _closed_form(call: _Call, own: Mapping, inputs: list, g: list, children_out: list[list]) -> tuple[str, dict] | None:
    """(rule, pieces) from the registry for a known layer called once, or None (then layer_vjp)."""
    m, names, kind = call.module, set(own), type(call.module)
    assert m is not None  # only calls that own parameters reach a rule
    if len(inputs) != 1 or len(g) != 1:
        return None
    a, gy = inputs[0], g[0]
    # A custom dot_general (e.g. quantised) is not the plain matmul the dense rule differentiates.
    plain = getattr(m, "dot_general", None) is None and getattr(m, "dot_general_cls", None) is None
    if call.method == "__call__" and not call.children and plain:
        return _leaf_call_rule(call, own, a, gy)
    if (kind is layers.GroupNorm and call.method == "__call__" and len(call.children) == 1
            and len(children_out[0]) == 1 and names == {"scale", "bias"}):
        return "norm_affine", affine_rule(own, children_out[0][0], gy)
    if (kind is nn.Embed and call.method == "attend" and names == {"embedding"} and not call.children
            and m.promote_dtype is flax_promote_dtype):
        piece = dense_rule({"kernel": own["embedding"].T}, a, gy)["kernel"]
        return "embed", {"embedding": reshaped(piece, own["embedding"].shape, transpose=True)}
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


def _group_pieces(params: PyTree, path: tuple[str, ...], group: list[_Call], calls: list[_Call], inputs: dict,
                  grads: dict, outputs: dict) -> tuple[str, dict[str, Piece]]:
    """The rule and pieces of one module's parameters, from all its calls in the forward pass."""
    node = _node(params, path)
    assert node is not None  # every recorded call's scope is in the parameters
    own = _own_leaves(params, path)
    if len(group) == 1:
        c = group[0]
        found = _closed_form(c, own, inputs[c.index], grads["out"][c.index], [outputs[k] for k in c.children])
        if found is not None and set(found[1]) == set(own):
            return found
    total = None
    for c in group:
        per_example = layer_vjp(c, calls, node, own, inputs[c.index], grads["out"][c.index],
                                [outputs[k] for k in c.children], [grads["in"][k] for k in c.children])
        total = per_example if total is None else jax.tree_util.tree_map(jnp.add, total, per_example)
    assert total is not None  # a group has at least one call
    return ("layer_vjp" if len(group) == 1 else "tied"), {name: materialised(v) for name, v in total.items()}


def pieces(model: nn.Module, params: PyTree, x: jax.Array, y: jax.Array, loss_fn: LossFn,
           axes: frozenset) -> tuple[Pieces, dict[tuple[str, ...], str]]:
    """A :class:`Piece` and a rule name per parameter leaf (keyed by its path), or :class:`Unsupported`.

    ``loss_fn(logits_i, y_i)`` is one example's loss. ``axes``: the mesh axes
    the batch varies over inside ``shard_map`` (the taps are made varying too).
    """
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
    out: Pieces = {}
    rules: dict[tuple[str, ...], str] = {}
    for path, group in by_path.items():
        rule, layer_pieces = _group_pieces(params, path, group, calls, inputs, grads, outputs)
        for name, piece in layer_pieces.items():
            out[path + (name,)], rules[path + (name,)] = piece, rule
    return out, rules
