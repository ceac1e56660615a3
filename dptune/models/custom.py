"""The user's own models (and losses) by import path, and the checks that make them safe for DP-SGD.

A model is named ``"package.module:factory"``; the factory is called as
``factory(num_classes=…, input_shape=…, **model_args)`` and returns a
:class:`flax.linen.Module` whose output on a batch is the logits
``[batch, num_classes]``. DP-SGD bounds each example's influence by clipping
that example's gradient, which is only meaningful when example *i*'s output
depends on example *i*'s input alone: :func:`check_model` refuses a model
whose outputs mix examples (BatchNorm in training mode, attention across the
batch axis, …) before anything trains.

A loss is named the same way; it is a *per-example* loss ``loss(logits, label)``
of one example's logits ``[num_classes]`` and its integer label, returning a
scalar (dptune vectorises it). The default is softmax cross-entropy.

``"__main__:name"`` names an object of the running script: it serves a study
optimised in that process (``workers=1``), not worker processes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dptune.config.schema import import_object
from dptune.errors import ConfigError

PerExampleLoss = Callable[[jax.Array, jax.Array], jax.Array]


def build_custom(path: str, num_classes: int, input_shape: tuple[int, ...], args: dict[str, Any]) -> nn.Module:
    """The Module the factory at ``path`` returns.

    Raises:
      ConfigError: the factory cannot be imported, raises, or returns something other than a Module.
    """
    factory = import_object(path, "model")
    if isinstance(factory, nn.Module):
        module = factory
    else:
        if not callable(factory):
            raise ConfigError("model", f"{path!r} is neither a Module nor a callable returning one")
        try:
            kwargs: dict[str, Any] = dict(args)
            params = inspect.signature(factory).parameters
            accepts_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
            for name, value in (("num_classes", num_classes), ("input_shape", input_shape)):
                if accepts_any or name in params:
                    kwargs.setdefault(name, value)
            module = factory(**kwargs)
        except ConfigError:
            raise
        except Exception as e:  # the user's code
            raise ConfigError("model", f"{path!r} raised {type(e).__name__}: {e}") from None
    if not isinstance(module, nn.Module):
        raise ConfigError("model", f"{path!r} returned a {type(module).__name__}, not a flax.linen.Module")
    return module


def load_loss(path: str | None) -> PerExampleLoss | None:
    """The per-example loss at ``path`` (None: softmax cross-entropy).

    Raises:
      ConfigError: it cannot be imported or is not callable.
    """
    if path is None:
        return None
    fn = import_object(path, "loss")
    if not callable(fn):
        raise ConfigError("loss", f"{path!r} is not callable")
    return fn


def batch_loss(loss: PerExampleLoss | None) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``losses(logits [B, C], labels [B]) -> [B]``: the per-example loss over a batch."""
    if loss is None:
        import optax

        return optax.softmax_cross_entropy_with_integer_labels
    return jax.vmap(loss)


def synthetic_inputs(input_shape: Sequence[int], dtype: str, batch: int = 4, seed: int = 0) -> np.ndarray:
    """Random inputs of one example's shape and dtype (ids 0/1 for integers): the checks never read the data."""
    rng = np.random.default_rng(seed)
    if np.issubdtype(np.dtype(dtype), np.integer):
        return rng.integers(0, 2, (batch, *input_shape)).astype(dtype)
    return rng.standard_normal((batch, *input_shape)).astype(dtype)


def check_model(module: nn.Module, input_shape: Sequence[int], dtype: str, num_classes: int,
                loss: PerExampleLoss | None = None) -> tuple[dict, np.ndarray]:
    """Refuse a model that DP-SGD cannot train: the checks of its interface, on synthetic inputs.

    It must initialise on one example, hold no state besides parameters (BatchNorm statistics are
    computed from many examples at once), map a batch of B inputs to logits [B, num_classes], and
    its loss must give one scalar per example. That no output mixes examples is checked by
    :func:`dptune.trainer.clipping.independence.check_per_example` (called with what this returns).

    Returns:
      The model's variables and the synthetic batch.

    Raises:
      ConfigError: naming ``model`` (or ``loss``) and the reason.
    """
    shape = tuple(input_shape)
    batch = 4
    x = synthetic_inputs(shape, dtype, batch)
    def failed(e: Exception) -> ConfigError:
        first = str(e).splitlines()[0] if str(e) else ""
        return ConfigError("model", f"does not run on inputs of shape {shape} ({dtype}): {type(e).__name__}: {first}")

    try:
        variables = module.init(jax.random.key(0), jnp.asarray(x[:1]))
    except Exception as e:  # the user's code
        raise failed(e) from None
    if set(variables) - {"params"}:
        raise ConfigError("model", f"has state besides parameters ({', '.join(sorted(set(variables) - {'params'}))}, "
                                   "e.g. BatchNorm statistics): such state is computed from many examples at once and "
                                   "breaks the per-example sensitivity DP-SGD relies on; use GroupNorm or LayerNorm")
    try:
        out = module.apply(variables, jnp.asarray(x))
    except Exception as e:  # the user's code
        raise failed(e) from None
    if not (isinstance(out, jax.Array) and out.shape == (batch, num_classes)):
        got = getattr(out, "shape", type(out).__name__)
        raise ConfigError("model", f"must return logits [batch, {num_classes}] (one row per example), got {got}")
    labels = jnp.zeros((batch,), jnp.int32)
    try:
        losses = batch_loss(loss)(out, labels)
    except Exception as e:  # the user's loss
        raise ConfigError("loss", f"fails on one example's logits and label: {type(e).__name__}: {e}") from None
    if getattr(losses, "shape", None) != (batch,):
        raise ConfigError("loss", "must return one scalar per example (a per-example loss of logits [C] and a label)")
    return dict(variables), x
