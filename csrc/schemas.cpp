// Schemas of the native kernels. The public, autograd-aware ops (kvpo::routed_attention,
// kvpo::velocity_energy) are defined in Python (kvpo_kernels) and call these per backend.
#include <torch/library.h>

TORCH_LIBRARY(kvpo, m) {
  m.def(
      "routed_attn_fwd(Tensor q, Tensor k_pages, Tensor v_pages, Tensor page_table, "
      "Tensor? page_lens, float scale) -> (Tensor, Tensor)");
  m.def(
      "routed_attn_bwd(Tensor dout, Tensor q, Tensor k_pages, Tensor v_pages, Tensor page_table, "
      "Tensor? page_lens, Tensor lse, Tensor delta, float scale, bool deterministic=True) -> "
      "(Tensor, Tensor, Tensor)");
  m.def("velocity_energy_fwd(Tensor v_pred, Tensor v_ref, Tensor? weight, bool mean) -> Tensor");
  m.def(
      "velocity_energy_bwd(Tensor grad, Tensor v_pred, Tensor v_ref, Tensor? weight, bool mean, "
      "bool need_ref) -> (Tensor, Tensor)");
}
