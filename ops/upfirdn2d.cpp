// Python binding of the fused upfirdn2d kernel (upfirdn2d.cu). Argument checks live here so the
// kernel can assume them; the maths is documented in upfirdn2d.py.
#include <torch/extension.h>

torch::Tensor upfirdn2d_cuda(torch::Tensor x, torch::Tensor g, int up_x, int up_y, int down_x, int down_y,
                             int pad_x0, int pad_x1, int pad_y0, int pad_y1);

static torch::Tensor upfirdn2d(torch::Tensor x, torch::Tensor g, int up_x, int up_y, int down_x, int down_y,
                               int pad_x0, int pad_x1, int pad_y0, int pad_y1) {
    TORCH_CHECK(x.is_cuda(), "upfirdn2d: x must be a CUDA tensor");
    TORCH_CHECK(x.dim() == 4, "upfirdn2d: x must be [N, C, H, W]");
    TORCH_CHECK(g.is_cuda() && g.device() == x.device(), "upfirdn2d: the filter must be on x's device");
    TORCH_CHECK(g.dim() == 2 && g.scalar_type() == torch::kFloat32 && g.is_contiguous(),
                "upfirdn2d: the filter must be a contiguous 2-D float32 tensor");
    TORCH_CHECK(up_x >= 1 && up_y >= 1 && down_x >= 1 && down_y >= 1, "upfirdn2d: up and down must be >= 1");
    TORCH_CHECK(x.numel() <= INT64_MAX / 4, "upfirdn2d: x is too large");
    TORCH_CHECK(x.size(2) * (int64_t)up_y + std::abs(pad_y0) + std::abs(pad_y1) < INT32_MAX &&
                x.size(3) * (int64_t)up_x + std::abs(pad_x0) + std::abs(pad_x1) < INT32_MAX,
                "upfirdn2d: image too large");
    return upfirdn2d_cuda(x, g, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("upfirdn2d", &upfirdn2d, "upsample, pad, FIR-filter (correlate with g), downsample");
}
