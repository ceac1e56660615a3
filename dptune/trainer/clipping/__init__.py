"""One clipping engine for DP-SGD: the summed per-example clipped gradient, with sensitivity C.

* :mod:`~dptune.trainer.clipping.engine` — :func:`clipped_sum` (the entry
  point), its typed result :class:`ClipResult`, and :func:`resolve`, the one
  place the ``clipping`` setting is interpreted;
* :mod:`~dptune.trainer.clipping.weights` — the per-example weights
  (clip or normalise), written once;
* :mod:`~dptune.trainer.clipping.rules` — the registry of per-layer rules;
* :mod:`~dptune.trainer.clipping.tapped` and
  :mod:`~dptune.trainer.clipping.intercept` — where the rules get each
  layer's inputs and output gradients (dptune's tapped layers; any Flax model);
* :mod:`~dptune.trainer.clipping.vmap` — the reference and fallback;
* :mod:`~dptune.trainer.clipping.independence` — the check that a model does
  not mix examples, without which no per-example bound holds.
"""

from dptune.trainer.clipping.engine import PATHS, SETTINGS, ClipResult, clipped_sum, cross_entropy, plan, resolve
from dptune.trainer.clipping.rules import RULE_NAMES, Unsupported
from dptune.trainer.clipping.weights import NORMALIZE_GAMMA, clip_weights, normalize_weights

__all__ = ["NORMALIZE_GAMMA", "PATHS", "RULE_NAMES", "SETTINGS", "ClipResult", "Unsupported", "clip_weights",
           "clipped_sum", "cross_entropy", "normalize_weights", "plan", "resolve"]
