"""Adapters that run public video transformers as kvpo streaming generators.

Each needs its model's package (``diffusers`` for :mod:`kvpo.adapters.wan`), imported only when
the adapter is.
"""
