// The one TORCH_LIBRARY block of ldm: every op schema lives here. Implementations register
// per dispatch key in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake (meta) and GroupNorm's autograd
// registrations are in ldm/kernels/*.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Empty module so `import ldm._C` loads the shared library (and so runs the registrations).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ldm, m) {
  // y = [silu](group_norm(x)); also returns the fp32 per-(n, group) mean and rstd, [N, G].
  m.def("group_norm_silu(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, "
        "bool silu) -> (Tensor, Tensor, Tensor)");
  // Gradients of x, weight, bias (undefined where output_mask is false / weight or bias absent).
  m.def("group_norm_silu_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, "
        "Tensor? weight, Tensor? bias, int num_groups, bool silu, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)");
  // One sampler step: guidance, parameterisation conversion and the update, fused.
  // coeffs layout: see ldm/kernels/sampler_step.py (COEFF_* indices).
  m.def("sampler_step(Tensor x, Tensor model_output, Tensor coeffs, Tensor? noise, "
        "Tensor? prev, int prediction_type, bool learned_variance) -> (Tensor, Tensor)");
  // softmax(q k^T * scale) v for q [B, H, N, D], k and v [B, H, M, D]; returns [B, H, N, D]
  // stored as [B, N, H, D]. Inference only (no autograd kernel); CPU bf16 in AVX-512 builds.
  m.def("flash_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  // The same attention with both products on AMX tiles; errors where the CPU has none.
  m.def("flash_attention_amx(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  // Winograd F(m x m, 3x3) transforms of fp32 channels-last tiles (ldm/kernels/winograd.py):
  // padded [N, m T_h + 2, m T_w + 2, C] -> B^T d B as [a, a, N, T_h, T_w, C], a = m + 2;
  // products [a, a, N, T_h, T_w, C] -> A^T P A + bias as [N, m T_h, m T_w, C].
  m.def("winograd_input(Tensor padded, int m) -> Tensor");
  m.def("winograd_output(Tensor prod, Tensor? bias, int m) -> Tensor");
}

// sampler_step is an inference update with no derivative. Falling through the Autograd key
// makes its outputs plain tensors, so a loss built only from them raises "does not require
// grad" instead of autograd's deprecated not-implemented fallback warning and backpropagating
// nothing. ldm.kernels.sampler_step_reference is the differentiable path.
TORCH_LIBRARY_IMPL(ldm, Autograd, m) {
  m.impl("sampler_step", torch::CppFunction::makeFallthrough());
}
