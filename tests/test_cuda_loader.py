"""The lazy build: nothing compiles at import, a failure is reported once and never retried, the CUDA
path is checked against the reference before it is trusted, and SEMANTICGAN_OPS=ref turns it all off."""
import os
import subprocess
import sys

import pytest
import torch

import ops
from ops import cuda_loader

# the package re-exports functions named like their modules, so take the modules themselves
bias_act_module = sys.modules["ops.bias_act"]
upfirdn2d_module = sys.modules["ops.upfirdn2d"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_builds_nothing():
    code = "import sys, ops; print('torch.utils.cpp_extension' in sys.modules, ops.cuda_loader._plugins)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "{}"]


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda_loader, "_plugins", {})
    monkeypatch.setenv("SEMANTICGAN_OPS_CACHE", str(tmp_path))
    monkeypatch.delenv("SEMANTICGAN_OPS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return tmp_path


def test_failed_build_is_reported_once_and_never_retried(fresh_loader, monkeypatch, capsys):
    calls = []

    def failing_compile(*args):
        calls.append(args)
        raise RuntimeError("nvcc fatal: the compiler's own message")

    monkeypatch.setattr(cuda_loader, "_compile", failing_compile)
    with pytest.warns(RuntimeWarning, match="the compiler's own message"):
        assert cuda_loader.load_plugin("upfirdn2d_plugin") is None
    for _ in range(3):
        assert cuda_loader.load_plugin("upfirdn2d_plugin") is None
    assert len(calls) == 1
    assert capsys.readouterr().err.count("could not build the CUDA op 'upfirdn2d_plugin'") == 1


def test_forced_ref_never_builds(fresh_loader, monkeypatch):
    monkeypatch.setenv("SEMANTICGAN_OPS", "ref")
    monkeypatch.setattr(cuda_loader, "_compile", lambda *a: pytest.fail("compiled although SEMANTICGAN_OPS=ref"))
    assert cuda_loader.load_plugin("upfirdn2d_plugin") is None


def test_cached_library_is_imported_without_building(fresh_loader, monkeypatch):
    sources = [os.path.join(cuda_loader._SOURCE_DIR, s) for s in ("bias_act.cpp", "bias_act.cu")]
    key = cuda_loader._build_key("bias_act_plugin", sources)
    os.makedirs(fresh_loader / key)
    (fresh_loader / key / f"{key}.so").write_bytes(b"stand-in")
    monkeypatch.setattr(cuda_loader, "_compile", lambda *a: pytest.fail("rebuilt a cached library"))
    monkeypatch.setattr(cuda_loader, "_import_library", lambda name, path: ("imported", name, path))
    got = cuda_loader.load_plugin("bias_act_plugin")
    assert got == ("imported", key, str(fresh_loader / key / f"{key}.so"))


def test_build_key_follows_the_sources(tmp_path):
    a = tmp_path / "k.cu"
    a.write_text("__global__ void k() {}")
    key1 = cuda_loader._build_key("k", [str(a)])
    assert key1 == cuda_loader._build_key("k", [str(a)])
    a.write_text("__global__ void k() { int changed; }")
    assert cuda_loader._build_key("k", [str(a)]) != key1


def test_compile_publishes_atomically_and_cleans_up(fresh_loader, monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    def fake_load(name, sources, build_directory, **kwargs):
        with open(os.path.join(build_directory, name + ".so"), "wb") as f:
            f.write(b"built")
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    final_dir = fresh_loader / "k_123"
    assert cuda_loader._compile("k_123", [], str(final_dir), str(final_dir / "k_123.so")) == "module"
    assert (final_dir / "k_123.so").read_bytes() == b"built"
    assert sorted(os.listdir(fresh_loader)) == ["k_123"] and os.listdir(final_dir) == ["k_123.so"]


def test_upfirdn2d_self_check_falls_back_once_on_a_wrong_kernel(monkeypatch):
    """A kernel that is 0.1% off is caught by the first-use check (run here on the CPU with a stand-in)."""
    def stand_in(scale):
        def make(up, down, pad, flip_filter, gain):
            class Apply:
                @staticmethod
                def apply(x, f):
                    return scale * upfirdn2d_module._upfirdn2d_ref(x, f, up, down, pad, flip_filter, gain)
            return Apply
        return make

    cpu, name = torch.device("cpu"), "upfirdn2d_plugin"
    monkeypatch.setattr(cuda_loader, "_plugins", {name: object()})  # "built"
    monkeypatch.setattr(cuda_loader, "_kernel_ok", {})
    monkeypatch.setattr(upfirdn2d_module, "_upfirdn2d_cuda", stand_in(1.0))
    assert cuda_loader.kernel_ok(name, cpu, upfirdn2d_module._self_check)

    monkeypatch.setattr(cuda_loader, "_kernel_ok", {})
    monkeypatch.setattr(upfirdn2d_module, "_upfirdn2d_cuda", stand_in(1.001))
    with pytest.warns(RuntimeWarning, match="disagrees with the reference"):
        assert not cuda_loader.kernel_ok(name, cpu, upfirdn2d_module._self_check)
    assert not cuda_loader.kernel_ok(name, cpu, lambda d: pytest.fail("checked twice"))


def test_bias_act_self_check_catches_a_wrong_second_derivative(monkeypatch):
    """The check compares second derivatives too: a kernel exact to first order but not to second fails."""
    def stand_in(second_order_exact):
        def make(dim, act, alpha, gain, clamp):
            def apply(x, b):
                y = bias_act_module._bias_act_ref(x, b, dim, act, alpha, gain, clamp)
                if second_order_exact or act not in ("tanh", "sigmoid"):
                    return y
                # same value and gradient at x, different curvature: add 1e-2 * (x - x0)^2 with x0 = x
                return y + 1e-2 * (x - x.detach()) ** 2
            return type("Apply", (), {"apply": staticmethod(apply)})
        return make

    cpu, name = torch.device("cpu"), "bias_act_plugin"
    monkeypatch.setattr(cuda_loader, "_plugins", {name: object()})
    monkeypatch.setattr(cuda_loader, "_kernel_ok", {})
    monkeypatch.setattr(bias_act_module, "_bias_act_cuda", stand_in(True))
    assert cuda_loader.kernel_ok(name, cpu, bias_act_module._self_check)
    monkeypatch.setattr(cuda_loader, "_kernel_ok", {})
    monkeypatch.setattr(bias_act_module, "_bias_act_cuda", stand_in(False))
    with pytest.warns(RuntimeWarning, match="disagrees"):
        assert not cuda_loader.kernel_ok(name, cpu, bias_act_module._self_check)


def test_a_kernel_that_raises_on_first_use_falls_back_once(monkeypatch):
    monkeypatch.setattr(cuda_loader, "_plugins", {"bias_act_plugin": object()})
    monkeypatch.setattr(cuda_loader, "_kernel_ok", {})

    def crashing_check(device):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    with pytest.warns(RuntimeWarning, match="no kernel image"):
        assert not cuda_loader.kernel_ok("bias_act_plugin", torch.device("cpu"), crashing_check)
    assert not cuda_loader.kernel_ok("bias_act_plugin", torch.device("cpu"), lambda d: pytest.fail("checked twice"))


def test_cpu_tensors_never_touch_the_plugin(monkeypatch):
    for module in (upfirdn2d_module, bias_act_module):
        monkeypatch.setattr(module, "_plugin", lambda: pytest.fail("plugin loaded for a CPU tensor"))
    x = torch.randn(1, 2, 4, 4)
    ops.upsample2d(x, ops.setup_filter([1, 3, 3, 1]))
    ops.bias_act(x, torch.zeros(2), act="lrelu")
