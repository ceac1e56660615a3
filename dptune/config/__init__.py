"""Settings: the study-file schema (the single source of truth for every setting and its default) and its loading.

No JAX. Imports :mod:`dptune.errors`, :mod:`dptune.choices` (the closed sets of names) and :mod:`dptune.privacy` only.
"""
