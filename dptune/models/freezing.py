"""Which layers train: ``all``, ``head`` or ``last_<k>`` blocks (transfer learning, Kurakin et al. 2022).

A model's *blocks* are its top-level modules in forward order, with a
normalisation layer folded into the block before it (``Conv_0`` +
``GroupNorm_0`` is one block); the head is the last block.

The choice becomes a mask of 0/1 scalars, one per parameter leaf, passed to
the compiled step as data: trials that freeze different layers share one
compilation. DP contract: frozen parameters are excluded from each example's
gradient *before* clipping (so the norm that is clipped is that of what
trains) and receive exactly zero update; their values came from a public
checkpoint, so they cost no privacy.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

from dptune.errors import ConfigError

PyTree = Any
_NORM = re.compile(r"^(GroupNorm|LayerNorm)_\d+$")
_LAST = re.compile(r"^last_(\d+)$")


def blocks(params: PyTree) -> list[list[str]]:
    """Top-level modules grouped into blocks, in forward order."""
    out: list[list[str]] = []
    for name in params:
        if out and _NORM.match(name):
            out[-1].append(name)
        else:
            out.append([name])
    return out


def trainable_modules(params: PyTree, spec: str) -> list[str]:
    """The top-level modules that ``spec`` (all | head | last_<k>) leaves trainable."""
    groups = blocks(params)
    if spec == "all":
        k = len(groups)
    elif spec == "head":
        k = 1
    elif (m := _LAST.match(spec)) and int(m.group(1)) >= 1:
        k = min(int(m.group(1)), len(groups))
    else:
        raise ConfigError("trainable", f"unknown {spec!r}; allowed: all, head, last_<k> (k >= 1 blocks of "
                                       f"{len(groups)})")
    return [name for group in groups[len(groups) - k:] for name in group]


def trainable_mask(params: PyTree, spec: str) -> PyTree:
    """A float32 scalar per parameter leaf: 1 trains, 0 is frozen."""
    keep = set(trainable_modules(params, spec))
    out = {}
    for name, sub in params.items():
        flag = jnp.float32(name in keep)
        out[name] = jax.tree_util.tree_map(lambda _, flag=flag: flag, sub)
    return out


def apply_mask(tree: PyTree, mask: PyTree | None) -> PyTree:
    """Zero the frozen leaves (``where``, so a NaN in a frozen gradient cannot leak through 0·NaN)."""
    if mask is None:
        return tree
    return jax.tree_util.tree_map(lambda g, m: jnp.where(m > 0, g, jnp.zeros_like(g)), tree, mask)
