// Python binding of the fused bias + activation kernel (bias_act.cu); the maths is in bias_act.py.
#include <torch/extension.h>

torch::Tensor bias_act_cuda(torch::Tensor x, torch::Tensor b, torch::Tensor xref, torch::Tensor yref,
                            torch::Tensor dy, int mode, int act, int dim, double alpha, double gain, double clamp);

static void check_like(const torch::Tensor& t, const torch::Tensor& x, const char* name) {
    TORCH_CHECK(t.numel() == 0 || (t.sizes() == x.sizes() && t.device() == x.device() && t.dtype() == x.dtype()),
                "bias_act: ", name, " must be empty or match x in shape, device and dtype");
}

static torch::Tensor bias_act(torch::Tensor x, torch::Tensor b, torch::Tensor xref, torch::Tensor yref,
                              torch::Tensor dy, int mode, int act, int dim, double alpha, double gain, double clamp) {
    TORCH_CHECK(x.is_cuda(), "bias_act: x must be a CUDA tensor");
    TORCH_CHECK(dim >= 0 && (dim < x.dim() || x.dim() == 0), "bias_act: dim out of range");
    TORCH_CHECK(b.numel() == 0 || (b.dim() == 1 && b.device() == x.device() && b.dtype() == x.dtype() &&
                                   x.dim() > dim && b.numel() == x.size(dim)),
                "bias_act: b must be empty or a vector of x.shape[dim] values on x's device and dtype");
    check_like(xref, x, "xref");
    check_like(yref, x, "yref");
    check_like(dy, x, "dy");
    TORCH_CHECK(mode >= 0 && mode <= 2, "bias_act: mode must be 0, 1 or 2");
    TORCH_CHECK(act >= 1 && act <= 5, "bias_act: unknown activation id");
    return bias_act_cuda(x, b, xref, yref, dy, mode, act, dim, alpha, gain, clamp);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("bias_act", &bias_act, "fused bias + activation (mode 0), its gradient (1) and second derivative (2)");
}
