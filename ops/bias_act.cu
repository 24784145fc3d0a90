// Fused bias + activation + gain + clamp, its gradient and its second derivative, elementwise.
//
// mode 0 (forward):  y  = clamp(act(x + b) * gain)
// mode 1 (gradient): dx = x * gain * act'(s) * [not clamped]        (here x holds the incoming gradient)
// mode 2 (second):   d  = x * dy * gain * act''(s) * [not clamped]  (x holds the gradient of dx, dy the first
//                                                                     incoming gradient)
// where s = xref + b. For linear, relu and lrelu act' follows from the sign of the output yref (so the
// forward input need not be kept) and act'' = 0; tanh and sigmoid read xref.
// Tensors are read in memory order; the channel of element i is (i / stride_of_dim) % size_of_dim, which
// holds for any dense layout (NCHW or channels_last alike).
#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

enum { ACT_LINEAR = 1, ACT_RELU = 2, ACT_LRELU = 3, ACT_TANH = 4, ACT_SIGMOID = 5 };

struct BiasActParams {
    int64_t n, step_b;
    int size_b, mode;
    float alpha, gain, clamp;  // clamp < 0: no clamping
};

constexpr int kThreads = 256, kPerThread = 4;

template <typename T>
static __device__ __forceinline__ T act_forward(int act, T s, T alpha) {
    switch (act) {
        case ACT_RELU: return s > T(0) ? s : T(0);
        case ACT_LRELU: return s > T(0) ? s : s * alpha;
        case ACT_TANH: return tanh(s);
        case ACT_SIGMOID: return T(1) / (T(1) + exp(-s));
        default: return s;
    }
}

template <typename scalar_t, int ACT>
__global__ void bias_act_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ b,
                                const scalar_t* __restrict__ xref, const scalar_t* __restrict__ yref,
                                const scalar_t* __restrict__ dy, scalar_t* __restrict__ out, BiasActParams p) {
    using T = at::opmath_type<scalar_t>;
    constexpr bool kFromY = ACT == ACT_LINEAR || ACT == ACT_RELU || ACT == ACT_LRELU;
    const T alpha = p.alpha, gain = p.gain, clamp = p.clamp;
    const int64_t base = (int64_t)blockIdx.x * kThreads * kPerThread + threadIdx.x;
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
        const int64_t i = base + (int64_t)k * kThreads;
        if (i >= p.n)
            return;
        const T bias = b ? static_cast<T>(b[(i / p.step_b) % p.size_b]) : T(0);
        const T v = static_cast<T>(x[i]);
        T r;
        if (p.mode == 0) {
            r = act_forward<T>(ACT, v + bias, alpha) * gain;
            if (clamp >= T(0))
                r = r > clamp ? clamp : (r < -clamp ? -clamp : r);
        } else if (kFromY) {  // derivative from the sign of the output; second derivative is zero
            const T yr = static_cast<T>(yref[i]);
            T d = ACT == ACT_RELU ? (yr > T(0) ? T(1) : T(0)) : ACT == ACT_LRELU ? (yr > T(0) ? T(1) : alpha) : T(1);
            if (clamp >= T(0) && !(yr < clamp && yr > -clamp))
                d = T(0);
            r = p.mode == 1 ? v * d * gain : T(0);
        } else {  // tanh, sigmoid: from the input
            const T a = act_forward<T>(ACT, static_cast<T>(xref[i]) + bias, alpha);
            T d1, d2;
            if (ACT == ACT_TANH) {
                d1 = T(1) - a * a;
                d2 = T(-2) * a * d1;
            } else {
                d1 = a * (T(1) - a);
                d2 = d1 * (T(1) - T(2) * a);
            }
            const T ya = a * gain;
            const bool kept = clamp < T(0) || (ya < clamp && ya > -clamp);
            r = !kept ? T(0) : p.mode == 1 ? v * d1 * gain : v * static_cast<T>(dy[i]) * d2 * gain;
        }
        out[i] = static_cast<scalar_t>(r);
    }
}

torch::Tensor bias_act_cuda(torch::Tensor x, torch::Tensor b, torch::Tensor xref, torch::Tensor yref,
                            torch::Tensor dy, int mode, int act, int dim, double alpha, double gain, double clamp) {
    const at::cuda::OptionalCUDAGuard device_guard(x.device());
    // One dense layout for every operand (the layout x suggests: NCHW or channels_last).
    const auto fmt = x.suggest_memory_format();
    if (!x.is_non_overlapping_and_dense())
        x = x.contiguous(fmt);
    auto like_x = [&](torch::Tensor t) { return t.numel() == 0 || t.strides() == x.strides() ? t : t.contiguous(fmt); };
    xref = like_x(xref);
    yref = like_x(yref);
    dy = like_x(dy);
    TORCH_CHECK(xref.numel() == 0 || xref.strides() == x.strides(), "bias_act: xref layout differs from x");
    TORCH_CHECK(yref.numel() == 0 || yref.strides() == x.strides(), "bias_act: yref layout differs from x");
    TORCH_CHECK(dy.numel() == 0 || dy.strides() == x.strides(), "bias_act: dy layout differs from x");
    if (b.numel() != 0)
        b = b.contiguous();

    auto out = torch::empty_like(x);  // same strides as a dense x
    BiasActParams p;
    p.n = x.numel();
    p.step_b = b.numel() ? x.stride(dim) : 1;
    p.size_b = b.numel() ? (int)b.numel() : 1;
    p.mode = mode;
    p.alpha = (float)alpha;
    p.gain = (float)gain;
    p.clamp = (float)clamp;
    if (p.n == 0)
        return out;
    const int64_t blocks = (p.n + kThreads * kPerThread - 1) / (kThreads * kPerThread);
    TORCH_CHECK(blocks <= INT32_MAX, "bias_act: tensor too large");
    AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(), "bias_act", [&] {
        auto ptr = [](const torch::Tensor& t) { return t.numel() ? t.data_ptr<scalar_t>() : nullptr; };
        auto run = [&](auto kernel) {
            kernel<<<(unsigned)blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                ptr(x), ptr(b), ptr(xref), ptr(yref), ptr(dy), out.data_ptr<scalar_t>(), p);
        };
        switch (act) {
            case ACT_RELU: run(bias_act_kernel<scalar_t, ACT_RELU>); break;
            case ACT_LRELU: run(bias_act_kernel<scalar_t, ACT_LRELU>); break;
            case ACT_TANH: run(bias_act_kernel<scalar_t, ACT_TANH>); break;
            case ACT_SIGMOID: run(bias_act_kernel<scalar_t, ACT_SIGMOID>); break;
            default: run(bias_act_kernel<scalar_t, ACT_LINEAR>); break;
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
}
