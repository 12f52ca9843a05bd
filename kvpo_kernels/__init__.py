"""kvpo_kernels: routed paged attention and velocity-energy ops for KVPO training.

Public ops (torch custom ops with fake kernels and autograd; one dispatch point in ``_backend``):

* :func:`routed_attention` - many branches attend to one shared paged KV cache through page tables.
* :func:`merge_attention` - log-sum-exp merge of two partial attentions.
* :func:`route_pages` - per-branch page tables by stochastic KV routing (drop pages).
* :func:`sample_pages` - per-branch page tables that refill a local window from older history.
* :func:`velocity_energy` - per-branch Trajectory Velocity Energy.
"""

from ._backend import BACKENDS, native_available, triton_available
from .reference import routed_attention_reference, velocity_energy_reference
from .routed_attention import merge_attention, routed_attention
from .routing import route_pages, sample_pages
from .velocity_energy import velocity_energy

__all__ = [
    "BACKENDS",
    "merge_attention",
    "native_available",
    "route_pages",
    "routed_attention",
    "routed_attention_reference",
    "sample_pages",
    "triton_available",
    "velocity_energy",
    "velocity_energy_reference",
]
__version__ = "0.1.0"
