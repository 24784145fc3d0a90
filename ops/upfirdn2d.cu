// Fused upfirdn2d: y[n,c,oy,ox] = sum_{ty,tx} g[ty,tx] * u[oy*down_y + ty - pad_y0, ox*down_x + tx - pad_x0]
// where u is x with (up - 1) zeros inserted after each sample. g is the correlation kernel (the Python
// side flips the filter and folds in the gain). One thread computes one output pixel of one plane; it
// visits only the taps that land on a real (non-inserted) sample, ceil(f/up) per axis (polyphase), so
// the zero-inserted image never exists. Neighbouring threads share input samples through L1.
#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

struct Upfirdn2dParams {
    int up_x, up_y, down_x, down_y, pad_x0, pad_y0;
    int in_w, in_h, out_w, out_h, filter_w, filter_h, channels;
    int64_t planes;
    int64_t x_stride_n, x_stride_c, x_stride_h, x_stride_w;
    int64_t y_stride_n, y_stride_c, y_stride_h, y_stride_w;
};

// Non-negative remainder: the first tap that hits a real sample when the tap-0 position is q.
static __device__ __forceinline__ int positive_mod(int a, int b) {
    int r = a % b;
    return r < 0 ? r + b : r;
}

// UP, DOWN, FH, FW are compile-time for the configurations the networks use (the tap loops unroll);
// 0 means "read it from p" (the generic kernel).
template <typename scalar_t, int UP, int DOWN, int FH, int FW>
__global__ void upfirdn2d_kernel(const scalar_t* __restrict__ x, const float* __restrict__ g,
                                 scalar_t* __restrict__ y, Upfirdn2dParams p) {
    using acc_t = at::opmath_type<scalar_t>;
    const int up_x = UP ? UP : p.up_x, up_y = UP ? UP : p.up_y;
    const int down_x = DOWN ? DOWN : p.down_x, down_y = DOWN ? DOWN : p.down_y;
    const int fh = FH ? FH : p.filter_h, fw = FW ? FW : p.filter_w;
    const int taps_y = (fh + up_y - 1) / up_y, taps_x = (fw + up_x - 1) / up_x;

    const int ox = blockIdx.x * blockDim.x + threadIdx.x;
    const int oy = blockIdx.y * blockDim.y + threadIdx.y;
    if (ox >= p.out_w || oy >= p.out_h)
        return;

    // Position of tap 0 in the zero-inserted image, the first tap on a real sample, and that sample.
    const int qy = oy * down_y - p.pad_y0, qx = ox * down_x - p.pad_x0;
    const int ty0 = positive_mod(-qy, up_y), tx0 = positive_mod(-qx, up_x);
    const int iy0 = (qy + ty0) / up_y, ix0 = (qx + tx0) / up_x;  // exact divisions

    for (int64_t plane = (int64_t)blockIdx.z * blockDim.z + threadIdx.z; plane < p.planes;
         plane += (int64_t)gridDim.z * blockDim.z) {
        const int64_t n = plane / p.channels, c = plane - n * p.channels;
        const scalar_t* xp = x + n * p.x_stride_n + c * p.x_stride_c;
        acc_t acc = 0;
#pragma unroll
        for (int ky = 0; ky < (FH && UP ? (FH + UP - 1) / UP : taps_y); ++ky) {
            const int ty = ty0 + ky * up_y, iy = iy0 + ky;
            if (ty >= fh || (unsigned)iy >= (unsigned)p.in_h)
                continue;
#pragma unroll
            for (int kx = 0; kx < (FW && UP ? (FW + UP - 1) / UP : taps_x); ++kx) {
                const int tx = tx0 + kx * up_x, ix = ix0 + kx;
                if (tx >= fw || (unsigned)ix >= (unsigned)p.in_w)
                    continue;
                acc += static_cast<acc_t>(xp[iy * p.x_stride_h + ix * p.x_stride_w]) *
                       static_cast<acc_t>(__ldg(&g[ty * fw + tx]));
            }
        }
        y[n * p.y_stride_n + c * p.y_stride_c + oy * p.y_stride_h + ox * p.y_stride_w] = static_cast<scalar_t>(acc);
    }
}

static int next_pow2(int v) {
    int r = 1;
    while (r < v)
        r *= 2;
    return r;
}

template <typename scalar_t, int UP, int DOWN, int FH, int FW>
static void launch(const torch::Tensor& x, const torch::Tensor& g, torch::Tensor& y, const Upfirdn2dParams& p) {
    // A 256-thread block covers a tile of the output plane; small planes put several planes in a block
    // so that no thread idles on the 4x4 and 8x8 layers.
    const int bx = std::min(32, next_pow2(p.out_w));
    const int by = std::min(next_pow2(p.out_h), std::max(1, 256 / bx));
    const int bz = std::max(1, 256 / (bx * by));
    const dim3 block(bx, by, bz);
    const int64_t gz = std::min<int64_t>((p.planes + bz - 1) / bz, 65535);
    const dim3 grid((p.out_w + bx - 1) / bx, (p.out_h + by - 1) / by, (unsigned)gz);
    upfirdn2d_kernel<scalar_t, UP, DOWN, FH, FW><<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), g.data_ptr<float>(), y.data_ptr<scalar_t>(), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

torch::Tensor upfirdn2d_cuda(torch::Tensor x, torch::Tensor g, int up_x, int up_y, int down_x, int down_y,
                             int pad_x0, int pad_x1, int pad_y0, int pad_y1) {
    const at::cuda::OptionalCUDAGuard device_guard(x.device());
    Upfirdn2dParams p;
    p.up_x = up_x; p.up_y = up_y; p.down_x = down_x; p.down_y = down_y;
    p.pad_x0 = pad_x0; p.pad_y0 = pad_y0;
    p.in_h = (int)x.size(2); p.in_w = (int)x.size(3);
    p.filter_h = (int)g.size(0); p.filter_w = (int)g.size(1);
    p.out_h = (p.in_h * up_y + pad_y0 + pad_y1 - p.filter_h + down_y) / down_y;
    p.out_w = (p.in_w * up_x + pad_x0 + pad_x1 - p.filter_w + down_x) / down_x;
    TORCH_CHECK(p.out_h >= 1 && p.out_w >= 1, "upfirdn2d: the output would be empty");
    p.channels = (int)x.size(1);
    p.planes = x.size(0) * x.size(1);
    auto y = torch::empty({x.size(0), x.size(1), p.out_h, p.out_w},
                          x.options().memory_format(x.suggest_memory_format()));
    if (y.numel() == 0)
        return y;
    p.x_stride_n = x.stride(0); p.x_stride_c = x.stride(1); p.x_stride_h = x.stride(2); p.x_stride_w = x.stride(3);
    p.y_stride_n = y.stride(0); p.y_stride_c = y.stride(1); p.y_stride_h = y.stride(2); p.y_stride_w = y.stride(3);

    const bool square4 = p.filter_h == 4 && p.filter_w == 4;
    const bool same_up = up_x == up_y, same_down = down_x == down_y;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "upfirdn2d", [&] {
        if (square4 && same_up && same_down && up_x == 2 && down_x == 1)
            launch<scalar_t, 2, 1, 4, 4>(x, g, y, p);
        else if (square4 && same_up && same_down && up_x == 1 && down_x == 2)
            launch<scalar_t, 1, 2, 4, 4>(x, g, y, p);
        else if (square4 && same_up && same_down && up_x == 1 && down_x == 1)
            launch<scalar_t, 1, 1, 4, 4>(x, g, y, p);
        else
            launch<scalar_t, 0, 0, 0, 0>(x, g, y, p);
    });
    return y;
}
