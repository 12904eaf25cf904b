"""In-container GPU memory guard: caps PyTorch and TensorFlow at the user's memory share.

GPUShareSpawner sets ``GPUSHARE_MEMORY_FRACTION`` (a float in (0, 1]) in every GPU
user's server. JAX and CuPy honour environment variables of their own, but
PyTorch before 2.10 and TensorFlow can only be capped by a call in the process.
This module makes that call without any change to user code:

* :func:`activate` puts a finder at the front of ``sys.meta_path``. It does nothing
  until ``torch`` or ``tensorflow`` is imported, so a process that never imports
  them pays one set lookup per new module and nothing else.
* When ``torch`` has been imported, the fraction is queued with
  ``torch.cuda._lazy_call``: torch runs queued calls inside its own lazy CUDA
  initialisation. Calling ``torch.cuda.set_per_process_memory_fraction`` directly
  would initialise CUDA at import time, and a process that forks afterwards
  (DataLoader workers) could no longer use CUDA in its children.
* When ``tensorflow`` has been imported, each GPU gets a logical device whose
  memory limit is the fraction of the GPU's total memory; TensorFlow only accepts
  this before its GPUs are initialised, which import alone does not do.

Nothing here may break the user's process: every failure becomes one warning on
stderr, and the process carries on without a cap.

Two ways into a user's server, both loading this file as ``gpushare_guard``:

* the start-up folder that the spawner mounts first on ``PYTHONPATH``
  (:func:`startup_files`): its ``sitecustomize.py`` loads this file, shipped
  beside it, only when torch or tensorflow is looked for. The image need not
  have jupyterhub-gpushare installed;
* ``guard_autostart.pth``, where the package is installed in the image.

This file must therefore import only the standard library, run on old Pythons
(3.7 syntax) and not refer to its own module name.
"""

from __future__ import annotations

import os
import sys

__all__ = ["FRACTION_ENV", "MEMORY_MIB_ENV", "activate", "parse_fraction", "startup_files"]

FRACTION_ENV = "GPUSHARE_MEMORY_FRACTION"
# Optional: the GPU's total memory in MiB, so TensorFlow's limit needs no NVML.
MEMORY_MIB_ENV = "GPUSHARE_GPU_MEMORY_MIB"

# torch reads PYTORCH_CUDA_ALLOC_CONF first (2.10, 2.11 measured), else PYTORCH_ALLOC_CONF.
_ALLOC_CONF_ENVS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
_TORCH_FRACTION_KEY = "per_process_memory_fraction"
# First torch release whose allocator understands the key; older ones reject the
# whole config ("Unrecognized key") at CUDA initialisation.
_TORCH_KEY_SINCE = (2, 10)

# Process-wide state lives in a synthetic module, not in this module's globals:
# the same source can be loaded twice in one process (as gpushare_guard and as
# jupyterhub_gpushare.guard), and the two copies must share one hook and one set
# of "already warned" keys.
_STATE_MODULE = "_gpushare_guard_state"
_STARTUP_GUARD_NAME = "gpushare_guard"


def _state():
    state = sys.modules.get(_STATE_MODULE)
    if state is None:
        # type(sys) is ModuleType; spelled so to avoid importing `types` at start-up
        state = type(sys)(_STATE_MODULE)
        state.finder = None
        state.warned = set()
        # what was done, for diagnostics and the benchmarks: {"torch": "...", ...}
        state.applied = {}
        sys.modules[_STATE_MODULE] = state
    return state


def _warn(key: str, message: str) -> None:
    """Report a problem once per process; never raises."""
    try:
        state = _state()
        if key in state.warned:
            return
        state.warned.add(key)
        text = f"gpushare guard: {message}"
        try:
            import warnings

            # warn_explicit with a made-up file name prints one clean line (no
            # source line) and still obeys the user's warning filters.
            warnings.warn_explicit(text, UserWarning, "gpushare-guard", 0, module="gpushare_guard")
        except Exception:
            # -W error turns the warning into an exception: still only report it
            sys.stderr.write(text + "\n")
    except Exception:
        pass


def parse_fraction(text: str | None) -> float | None:
    """The memory fraction in ``text`` as a float in (0, 1], or None if it is not one."""
    if text is None:
        return None
    try:
        value = float(text.strip())
    except (TypeError, ValueError):
        return None
    # NaN fails both comparisons, so it is rejected too
    if 0.0 < value <= 1.0:
        return value
    return None


def _parse_positive(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text.strip())
    except (TypeError, ValueError):
        return None
    if value > 0.0 and value != float("inf"):
        return value
    return None


def activate() -> bool:
    """Install the import hook if ``GPUSHARE_MEMORY_FRACTION`` holds a valid fraction.

    Idempotent and cheap; returns whether the hook is installed. Never raises.
    """
    try:
        return _activate()
    except Exception as exc:
        _warn("activate", f"not active ({exc.__class__.__name__}: {exc}); no memory cap")
        return False


def _activate() -> bool:
    state = _state()
    if state.finder is not None:
        return True
    raw = os.environ.get(FRACTION_ENV)
    if raw is None or not raw.strip():
        return False
    fraction = parse_fraction(raw)
    if fraction is None:
        _warn("fraction", f"{FRACTION_ENV}={raw!r} is not a number in (0, 1]; no memory cap")
        return False
    finder = _GuardFinder(fraction)
    state.finder = finder
    sys.meta_path.insert(0, finder)
    # A framework imported before activation (by an earlier .pth file, say) gets
    # its cap now; for torch that still only queues the call.
    for name in list(finder.pending):
        module = sys.modules.get(name)
        if module is not None:
            finder.fire(name, module)
    return True


class _GuardFinder:
    """Meta path finder that wraps the loaders of torch and tensorflow.

    It finds nothing itself: it asks the finders after it for the real spec and
    swaps in a loader that runs the real one and then applies the cap.
    """

    def __init__(self, fraction: float) -> None:
        import _thread

        self.fraction = fraction
        self.pending = {"torch": _apply_torch, "tensorflow": _apply_tensorflow}
        # another finder may call importlib.util.find_spec(name) while we ask it,
        # which would come back here; per thread, since imports run in threads too
        self._local = _thread._local()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.pending or getattr(self._local, "busy", False):
            return None
        self._local.busy = True
        try:
            spec = None
            for finder in list(sys.meta_path):
                if finder is self:
                    continue
                find = getattr(finder, "find_spec", None)
                if find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
        except Exception:
            # let the import machinery search (and fail) without us
            return None
        finally:
            self._local.busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _HookLoader(spec.loader, self, fullname)
        return spec

    def invalidate_caches(self) -> None:
        pass

    def fire(self, name: str, module) -> None:
        apply = self.pending.pop(name, None)
        if apply is None:
            return
        try:
            apply(module, self.fraction)
        except Exception as exc:
            _warn(name, f"could not cap {name}'s GPU memory ({exc.__class__.__name__}: {exc})")
        if not self.pending:
            # both hooks have fired: stop costing anything on later imports
            try:
                sys.meta_path.remove(self)
            except ValueError:
                pass


class _HookLoader:
    """Runs the real loader, then the finder's hook for this module."""

    def __init__(self, loader, finder: _GuardFinder, name: str) -> None:
        self._loader = loader
        self._finder = finder
        self._name = name

    def create_module(self, spec):
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module) -> None:
        loader = self._loader
        # Hide the wrapper before the module's own code runs, so that torch (and
        # importlib.resources, reload, pickling) only ever see the real loader.
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = loader
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = loader
        loader.exec_module(module)
        # a module may replace itself in sys.modules while it executes
        self._finder.fire(self._name, sys.modules.get(self._name, module))

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


# --- PyTorch -----------------------------------------------------------------


def _alloc_conf() -> tuple[str | None, str]:
    for name in _ALLOC_CONF_ENVS:
        value = os.environ.get(name)
        if value and value.strip():
            return name, value
    return None, ""


def _conf_entries(conf: str) -> list[str]:
    """Split an allocator config at commas, except inside ``[...]`` (roundup lists)."""
    entries: list[str] = []
    depth = 0
    start = 0
    for i, char in enumerate(conf):
        if char == "[":
            depth += 1
        elif char == "]":
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            entries.append(conf[start:i])
            start = i + 1
    entries.append(conf[start:])
    return [entry.strip() for entry in entries if entry.strip()]


def _conf_key(entry: str) -> str:
    return entry.split(":", 1)[0].strip()


def _conf_value(entry: str) -> str:
    return entry.split(":", 1)[1].strip() if ":" in entry else ""


def _without_key(conf: str, key: str) -> str:
    return ",".join(entry for entry in _conf_entries(conf) if _conf_key(entry) != key)


def _version_tuple(version: object) -> tuple[int, int] | None:
    parts = str(version).split(".")
    numbers = []
    for part in parts[:2]:
        digits = ""
        for char in part:
            if not char.isdigit():
                break
            digits += char
        if not digits:
            return None
        numbers.append(int(digits))
    if len(numbers) < 2:
        return None
    return numbers[0], numbers[1]


def _apply_torch(torch, fraction: float) -> None:
    state = _state()
    conf_env, conf = _alloc_conf()
    entries = _conf_entries(conf)
    backends = [_conf_value(e) for e in entries if _conf_key(e) == "backend"]
    if backends and backends[-1] == "cudaMallocAsync":
        # measured on 2.11: with this backend the fraction is not enforced at all
        _warn(
            "cudaMallocAsync",
            f"{conf_env} selects backend:cudaMallocAsync, which ignores the per-process "
            "memory fraction: this process's GPU memory is not capped",
        )
    if any(_conf_key(e) == _TORCH_FRACTION_KEY for e in entries):
        version = _version_tuple(getattr(torch, "__version__", ""))
        if version is None or version >= _TORCH_KEY_SINCE:
            # the allocator applies the cap itself from its config
            state.applied["torch"] = "allocator config"
            return
        # torch <= 2.9 would fail every CUDA use with "Unrecognized key": take the
        # key out before CUDA starts (torch reads the variable at CUDA init) and
        # apply the fraction through the hook instead.
        for name in _ALLOC_CONF_ENVS:
            value = os.environ.get(name)
            if value and _TORCH_FRACTION_KEY in value:
                stripped = _without_key(value, _TORCH_FRACTION_KEY)
                if stripped:
                    os.environ[name] = stripped
                else:
                    del os.environ[name]
        _warn(
            "old-torch-key",
            f"torch {torch.__version__} does not know {_TORCH_FRACTION_KEY} in {conf_env}; "
            "removed it and capping through torch.cuda.set_per_process_memory_fraction",
        )
    cuda = getattr(torch, "cuda", None)
    lazy_call = getattr(cuda, "_lazy_call", None)
    setter = getattr(cuda, "set_per_process_memory_fraction", None)
    if not callable(lazy_call) or not callable(setter):
        _warn(
            "torch-api",
            "this torch lacks torch.cuda._lazy_call or set_per_process_memory_fraction; "
            "GPU memory is not capped",
        )
        return

    def apply_at_cuda_init() -> None:
        # Runs inside torch's lazy CUDA initialisation: an exception here would
        # make that initialisation fail (DeferredCudaCallError), so none escapes.
        try:
            count = cuda.device_count()
            for index in range(count):
                # the cap is per device; a shared-GPU pod normally sees one
                setter(fraction, index)
            state.applied["torch"] = f"set_per_process_memory_fraction({fraction}) x{count}"
        except Exception as exc:
            _warn(
                "torch-apply",
                f"torch.cuda.set_per_process_memory_fraction failed "
                f"({exc.__class__.__name__}: {exc}); GPU memory is not capped",
            )

    lazy_call(apply_at_cuda_init)
    state.applied.setdefault("torch", "queued for CUDA initialisation")


# --- TensorFlow --------------------------------------------------------------


def _nvml_total_mib() -> float | None:
    """Smallest total memory among the visible GPUs, from NVML (no CUDA context)."""
    import ctypes

    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if nvml.nvmlInit_v2() != 0:
        return None
    try:

        class Memory(ctypes.Structure):
            _fields_ = [
                ("total", ctypes.c_ulonglong),
                ("free", ctypes.c_ulonglong),
                ("used", ctypes.c_ulonglong),
            ]

        count = ctypes.c_uint()
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return None
        totals = []
        for index in range(count.value):
            handle = ctypes.c_void_p()
            if nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
                continue
            memory = Memory()
            if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) == 0:
                totals.append(memory.total)
        return min(totals) / 2**20 if totals else None
    finally:
        nvml.nvmlShutdown()


def _nvidia_smi_total_mib() -> float | None:
    import subprocess

    result = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    if result.returncode != 0:
        return None
    totals = [float(line) for line in result.stdout.split() if line.strip()]
    return min(totals) if totals else None


def _total_memory_mib() -> float | None:
    raw = os.environ.get(MEMORY_MIB_ENV)
    if raw is not None and raw.strip():
        value = _parse_positive(raw)
        if value is not None:
            return value
        _warn("memory-mib", f"{MEMORY_MIB_ENV}={raw!r} is not a positive number; asking NVML")
    for probe in (_nvml_total_mib, _nvidia_smi_total_mib):
        try:
            value = probe()
        except Exception:
            value = None
        if value:
            return value
    return None


def _apply_tensorflow(tf, fraction: float) -> None:
    config = tf.config
    # Listing initialises the driver but creates no CUDA context, and TensorFlow
    # documents it as the way to get devices for set_logical_device_configuration.
    gpus = config.list_physical_devices("GPU")
    if not gpus:
        return
    total = _total_memory_mib()
    if total is None:
        _warn(
            "tensorflow-total",
            f"cannot tell the GPU's total memory (set {MEMORY_MIB_ENV}, or make NVML or "
            "nvidia-smi available): TensorFlow's GPU memory is not capped",
        )
        return
    limit = max(1, int(fraction * total))
    for gpu in gpus:
        config.set_logical_device_configuration(
            gpu, [config.LogicalDeviceConfiguration(memory_limit=limit)]
        )
    _state().applied["tensorflow"] = f"memory_limit={limit} MiB x{len(gpus)}"


# --- start-up folder ---------------------------------------------------------

_SITECUSTOMIZE = '''\
"""jupyterhub-gpushare start-up hook; GPUShareSpawner puts this folder first on PYTHONPATH.

1. Arms the GPU memory guard, gpushare_guard.py beside this file. The guard is
   only loaded when torch or tensorflow is about to be imported: this folder is
   usually a read-only ConfigMap, so Python cannot cache the guard's bytecode,
   and compiling it would cost every Python process a few milliseconds.
2. Runs the sitecustomize that Python would have run without this folder (the
   image's own), once.
Neither step may stop the interpreter: problems are reported on stderr.
"""

import os
import sys

_GPUSHARE_TARGETS = ("torch", "tensorflow")


def _gpushare_startup():
    here = os.path.dirname(os.path.realpath(__file__))
    marker = "_gpushare_sitecustomize_chain"
    if marker in sys.modules:
        # The image's sitecustomize we chained to has run this file again (it
        # chains too): the guard is already armed and chaining again would loop.
        return None
    raw = os.environ.get("GPUSHARE_MEMORY_FRACTION", "").strip()
    if raw:
        try:
            _gpushare_arm(here, raw)
        except Exception as exc:
            _gpushare_report(exc)
    return _gpushare_chain(here, marker)


def _gpushare_report(exc):
    sys.stderr.write(
        f"gpushare guard: not active ({exc.__class__.__name__}: {exc}); no memory cap\\n"
    )


def _gpushare_arm(here, raw):
    state = sys.modules.get("_gpushare_guard_state")
    if state is not None and state.finder is not None:
        # already active: the packaged guard, started by its .pth file
        return
    try:
        fraction = float(raw)
    except ValueError:
        fraction = 0.0
    if not 0.0 < fraction <= 1.0 or any(name in sys.modules for name in _GPUSHARE_TARGETS):
        # rare cases: the guard itself warns about the value, or caps now
        _gpushare_load_guard(here).activate()
        return
    sys.meta_path.insert(0, _GPUShareLazyGuard(here))


class _GPUShareLazyGuard:
    """Loads and activates the guard when torch or tensorflow is first looked for."""

    def __init__(self, here):
        self.here = here

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _GPUSHARE_TARGETS:
            return None
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
        try:
            if not _gpushare_load_guard(self.here).activate():
                return None
            # the guard's own finder wraps the framework's loader
            finder = sys.modules["_gpushare_guard_state"].finder
            return finder.find_spec(fullname, path, target)
        except Exception as exc:
            _gpushare_report(exc)
            return None

    def invalidate_caches(self):
        pass


def _gpushare_load_guard(here):
    guard = sys.modules.get("gpushare_guard")
    if guard is not None:
        return guard
    # importlib.machinery is nearly free here; importlib.util is not
    from importlib.machinery import ModuleSpec, SourceFileLoader

    path = os.path.join(here, "gpushare_guard.py")
    loader = SourceFileLoader("gpushare_guard", path)
    guard = type(sys)("gpushare_guard")
    guard.__file__ = path
    guard.__loader__ = loader
    guard.__spec__ = ModuleSpec("gpushare_guard", loader, origin=path)
    sys.modules["gpushare_guard"] = guard
    try:
        loader.exec_module(guard)
    except BaseException:
        del sys.modules["gpushare_guard"]
        raise
    return guard


def _gpushare_is_startup_folder(path):
    # another copy of this folder (mounted twice, say) must not count as the image's
    return os.path.isfile(os.path.join(path, "gpushare_guard.py")) and os.path.isfile(
        os.path.join(path, "sitecustomize.py")
    )


def _gpushare_chain(here, marker):
    try:
        from importlib.machinery import PathFinder

        spec = None
        # Python stopped at the first sitecustomize on sys.path, this one; the
        # image's is the first one found when this folder is left out.
        for entry in list(sys.path):
            path = os.path.realpath(entry or os.curdir)
            if path == here or _gpushare_is_startup_folder(path):
                continue
            found = PathFinder.find_spec("sitecustomize", [entry])
            if found is not None and found.loader is not None:
                spec = found
                break
        if spec is None:
            return None
        # only paid for when the image has a sitecustomize of its own
        import importlib.util

        module = importlib.util.module_from_spec(spec)
    except Exception as exc:
        sys.stderr.write(
            f"gpushare guard: could not look for the image's sitecustomize ({exc})\\n"
        )
        return None
    sys.modules[marker] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        # what site.py itself does when a sitecustomize fails
        if sys.flags.verbose:
            sys.excepthook(*sys.exc_info())
        else:
            sys.stderr.write(
                "Error in sitecustomize; set PYTHONVERBOSE for traceback:\\n"
                f"{err.__class__.__name__}: {err}\\n"
            )
    finally:
        sys.modules.pop(marker, None)
    return spec.origin


# the file of the image's sitecustomize that was run, or None
gpushare_chained = _gpushare_startup()
'''


def _own_source() -> str:
    try:
        with open(__file__, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, NameError):
        import inspect

        return inspect.getsource(sys.modules[__name__])


def startup_files() -> dict[str, str]:
    """The start-up folder's files, ``{file name: text}``, for the spawner's ConfigMap.

    The folder goes first on the user's ``PYTHONPATH``. Its ``sitecustomize.py``
    activates the guard (this module's source, shipped as ``gpushare_guard.py``)
    and then runs the image's own ``sitecustomize``, if any.
    """
    return {
        "sitecustomize.py": _SITECUSTOMIZE,
        f"{_STARTUP_GUARD_NAME}.py": _own_source(),
    }
