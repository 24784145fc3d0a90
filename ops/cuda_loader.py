"""Lazy, once-only compilation of the fused CUDA ops; what StyleGAN2 users ran into, and what this does instead:

* Compiling at import broke every CPU-only machine: here an op calls `load_plugin` on its first CUDA tensor.
* A failed build retried on every call made training crawl: here it is reported once, with the compiler's
  own error, and the reference path is used for the rest of the process.
* A stale build lock (a process killed mid-build) hung every later start-up: here there is no lock. Each
  process compiles in a private folder and atomically renames the library into a cache folder keyed by a
  hash of the sources and the toolchain; a cache hit imports it directly, without ninja.
* A kernel that compiles is not yet right: `kernel_ok` runs each op's self-check against its reference on
  tiny inputs, once per device, and falls back (loudly, once) if they disagree.

Environment variables:
    SEMANTICGAN_OPS=ref          never build or use the CUDA kernels (every op takes the reference path).
    SEMANTICGAN_OPS_CACHE=DIR    where built libraries live (default ~/.cache/semanticgan/ops).
    SEMANTICGAN_OPS_VERBOSE=1    show the compiler's command lines while building.
"""

import hashlib
import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile
import warnings

import torch

_SOURCE_DIR = os.path.dirname(os.path.abspath(__file__))
PLUGIN_SOURCES = {name + "_plugin": [name + ".cpp", name + ".cu"] for name in ("upfirdn2d", "bias_act")}  # in ops/
_plugins = {}  # name -> loaded module, or None after a failure (never retried)
_kernel_ok = {}  # (plugin name, device) -> whether its kernels passed their self-check there


def ops_forced_to_ref():
    return os.environ.get("SEMANTICGAN_OPS", "").strip().lower() == "ref"


def warn_once(key, message, _seen=set()):
    """A fallback must be loud, but not on every call."""
    if key not in _seen:
        _seen.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        print(f"semanticgan.ops: {message}", file=sys.stderr, flush=True)


def use_cuda(x, impl):
    """Whether an op asked for `impl` ('cuda', 'ref' or None = automatic) should try its kernel on x."""
    if impl not in (None, "cuda", "ref"):
        raise ValueError(f"impl must be 'cuda', 'ref' or None, got {impl!r}")
    return impl != "ref" and x.is_cuda and not (impl is None and ops_forced_to_ref())


def kernel_ok(name, device, self_check):
    """Build plugin `name` once and, once per device, run `self_check(device)` (the kernel against the
    reference on tiny inputs; it warns on a mismatch). False means: use the reference on this device."""
    key = (name, str(device))
    if key not in _kernel_ok:
        _kernel_ok[key] = ok = load_plugin(name) is not None  # provisional: the self-check runs the kernel
        try:
            _kernel_ok[key] = ok and self_check(device)
        except Exception as e:  # noqa: BLE001 - e.g. "no kernel image is available for this device"
            warn_once(f"{name}-selfcheck-error",
                      f"the CUDA op '{name}' failed its first run on {device} ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[0][:300]}); using the reference implementation for the rest "
                      f"of this run.")
            _kernel_ok[key] = False
    return _kernel_ok[key]


def _build_key(name, sources):
    """Hash of everything that changes the binary: the sources and headers, torch, CUDA, the GPU arch list."""
    data = [os.path.basename(p).encode() + pathlib.Path(p).read_bytes() for p in sorted(sources)]
    headers = sorted(p for p in os.listdir(_SOURCE_DIR) if p.endswith((".h", ".cuh")))
    data += [pathlib.Path(_SOURCE_DIR, p).read_bytes() for p in headers]
    # without an arch list, torch builds for the GPUs it sees
    archs = str(sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})) \
        if torch.cuda.is_available() else ""
    data += [s.encode() for s in (torch.__version__, str(torch.version.cuda),
                                  os.environ.get("TORCH_CUDA_ARCH_LIST", ""), archs, sys.version)]
    return f"{name}_{hashlib.sha256(b''.join(data)).hexdigest()[:16]}"


def _import_library(module_name, path):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_plugin(name):
    """The compiled extension `name` (a key of PLUGIN_SOURCES), or None (use the reference; the reason has
    been printed once). Call it only for a CUDA tensor: the first call compiles (a minute or two)."""
    if name in _plugins:
        return _plugins[name]
    _plugins[name] = None
    if ops_forced_to_ref():
        return None
    if not torch.cuda.is_available():
        warn_once(f"{name}-nocuda", f"{name}: CUDA is not available, using the reference implementation.")
        return None
    try:
        _plugins[name] = build(name)
    except Exception as e:  # noqa: BLE001 - any failure means "use the reference", reported once
        detail = str(e).strip()
        detail = detail if len(detail) <= 4000 else "...\n" + detail[-4000:]
        warn_once(f"{name}-build", f"could not build the CUDA op '{name}'; using the reference implementation for "
                                   f"the rest of this run. Set SEMANTICGAN_OPS=ref to silence this. Error:\n{detail}")
    return _plugins[name]


def build(name):
    """Import the cached library of plugin `name`, compiling it first if needed; raises on failure.
    Needs a CUDA compiler but no GPU, so `python -m ops` can check the sources anywhere."""
    sources = [os.path.join(_SOURCE_DIR, s) for s in PLUGIN_SOURCES[name]]
    key = _build_key(name, sources)
    default_cache = os.path.join(os.path.expanduser("~"), ".cache", "semanticgan", "ops")
    final_dir = os.path.join(os.environ.get("SEMANTICGAN_OPS_CACHE", default_cache), key)
    final_lib = os.path.join(final_dir, key + (".so" if os.name != "nt" else ".pyd"))
    if os.path.isfile(final_lib):
        return _import_library(key, final_lib)
    return _compile(key, sources, final_dir, final_lib)


def _compile(key, sources, final_dir, final_lib):
    from torch.utils.cpp_extension import load  # imported here: pulls in the build machinery only on demand

    os.makedirs(os.path.dirname(final_dir), exist_ok=True)
    print(f"semanticgan.ops: compiling {key} (once; cached in {final_dir})", file=sys.stderr, flush=True)
    private_dir = tempfile.mkdtemp(prefix=key + ".", dir=os.path.dirname(final_dir))
    try:
        module = load(name=key, sources=sources, build_directory=private_dir, extra_cflags=["-O3"],
                      extra_cuda_cflags=["-O3", "-lineinfo"], verbose=os.environ.get("SEMANTICGAN_OPS_VERBOSE") == "1")
        built = [f for f in os.listdir(private_dir) if f.startswith(key) and f.endswith((".so", ".pyd"))]
        if not built:
            raise RuntimeError(f"the build finished but left no library in {private_dir}")
        # Publish atomically: a reader sees either no library or a complete one, never half a file.
        os.makedirs(final_dir, exist_ok=True)
        staged = os.path.join(final_dir, f".{os.getpid()}.{os.path.basename(final_lib)}")
        shutil.copyfile(os.path.join(private_dir, built[0]), staged)
        os.replace(staged, final_lib)
        return module
    finally:
        shutil.rmtree(private_dir, ignore_errors=True)
