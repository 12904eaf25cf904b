"""In-container GPU memory guard: keeps frameworks to the user's memory share, and says so.

GPUShareSpawner sets ``GPUSHARE_MEMORY_FRACTION`` (a float in (0, 1]) in every GPU
user's server. JAX and CuPy honour environment variables of their own, but
PyTorch before 2.10 and TensorFlow can only be capped by a call in the process.
This module makes that call without any change to user code, and tells the user
about the share:

* :func:`activate` puts a finder at the front of ``sys.meta_path``. It does nothing
  until torch, tensorflow, jax or cupy is imported, so a process that never
  imports them pays one set lookup per new module and nothing else.
* When ``torch`` has been imported, the fraction is queued with
  ``torch.cuda._lazy_call``: torch runs queued calls inside its own lazy CUDA
  initialisation. Calling ``torch.cuda.set_per_process_memory_fraction`` directly
  would initialise CUDA at import time, and a process that forks afterwards
  (DataLoader workers) could no longer use CUDA in its children. The call is
  made whatever the allocator settings: unlike the allocator option
  ``per_process_memory_fraction``, it also holds under ``backend:cudaMallocAsync``
  (measured, ``benchmarks/gpu_memory_guard.py``). Allocator options that the
  imported torch is too old to know are taken out of ``PYTORCH_CUDA_ALLOC_CONF``
  before CUDA starts, since torch would fail every CUDA call on them.
* When ``tensorflow`` has been imported, each GPU gets a logical device whose
  memory limit is the fraction of the GPU's total memory; TensorFlow only accepts
  this before its GPUs are initialised, which import alone does not do.
* Users are told: one line on stderr (which a notebook shows under the cell)
  when the first framework starts using the GPU, and a note on the first
  out-of-memory error that reaches the user (script or notebook), saying that
  the limit is their share, how big it is and what to do. Once per process
  each; ``GPUSHARE_NOTICE=0`` turns both off.

Nothing here may break the user's process: every failure becomes one warning on
stderr, and the process carries on without a cap.

Two ways into a user's server, both loading this file as ``gpushare_guard``:

* the start-up folder that the spawner mounts first on ``PYTHONPATH``
  (:func:`startup_files`): its ``sitecustomize.py`` (``startup/`` beside this
  file) loads this file, shipped beside it, only when a framework is looked for.
  The image need not have jupyterhub-gpushare installed;
* ``guard_autostart.pth``, where the package is installed in the image.

This file must therefore import only the standard library, run on old Pythons
(3.7 syntax) and not refer to its own module name.
"""

from __future__ import annotations

import os
import sys

__all__ = [
    "FRACTION_ENV",
    "MEMORY_MIB_ENV",
    "NOTICE_ENV",
    "REPLICAS_ENV",
    "SHARING_ENV",
    "SLICES_ENV",
    "activate",
    "notice_text",
    "oom_hint_text",
    "parse_fraction",
    "startup_files",
]

FRACTION_ENV = "GPUSHARE_MEMORY_FRACTION"
# Optional: the GPU's total memory in MiB, so TensorFlow's limit needs no NVML.
MEMORY_MIB_ENV = "GPUSHARE_GPU_MEMORY_MIB"
SLICES_ENV = "GPUSHARE_GPU_SLICES"
REPLICAS_ENV = "GPUSHARE_GPU_REPLICAS"
# How the node shares its GPUs: "mps" (the driver enforces a per-process memory
# limit), "time-slicing" (only these cooperative caps), or empty when unknown.
SHARING_ENV = "GPUSHARE_SHARING"
# "0" turns the notice and the out-of-memory hint off.
NOTICE_ENV = "GPUSHARE_NOTICE"

# torch reads PYTORCH_CUDA_ALLOC_CONF first (2.10, 2.11 measured), else PYTORCH_ALLOC_CONF.
_ALLOC_CONF_ENVS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
# The first torch release that knows each allocator option. Older releases
# reject the whole config ("Unrecognized key" / "Unrecognized CachingAllocator
# option") at CUDA initialisation, so every CUDA use fails.
_TORCH_KEYS_SINCE = {
    "backend": (2, 0),
    "expandable_segments": (2, 1),
    "per_process_memory_fraction": (2, 10),
}
_TARGETS = ("torch", "tensorflow", "jax", "cupy")
_FRAMEWORK_NAMES = {"torch": "PyTorch", "tensorflow": "TensorFlow", "jax": "JAX", "cupy": "CuPy"}
# What to do about an out-of-memory error, per framework.
_FREE_ADVICE = {
    "torch": "free what you no longer need (del the tensors, then torch.cuda.empty_cache()), "
    "use smaller batches",
    "jax": "delete arrays you no longer need, use smaller batches",
    "cupy": "free what you no longer need (del the arrays, then "
    "cupy.get_default_memory_pool().free_all_blocks()), use smaller arrays",
    "tensorflow": "use smaller batches or a smaller model",
}

# Process-wide state lives in a synthetic module, not in this module's globals:
# the same source can be loaded twice in one process (as gpushare_guard and as
# jupyterhub_gpushare.guard), and the two copies must share one hook and one set
# of "already warned" keys.
_STATE_MODULE = "_gpushare_guard_state"
_STARTUP_GUARD_NAME = "gpushare_guard"
_STARTUP_FOLDER = "startup"

GiB = 1 << 30


def _state():
    state = sys.modules.get(_STATE_MODULE)
    if state is None:
        # type(sys) is ModuleType; spelled so to avoid importing `types` at start-up
        state = type(sys)(_STATE_MODULE)
        state.finder = None
        state.warned = set()
        # what was done, for diagnostics and the benchmarks: {"torch": "...", ...}
        state.applied = {}
        # each framework's cap in bytes, for the out-of-memory hint ({} until known)
        state.caps = {}
        state.noticed = False
        state.hinted = False
        state.hooks = False
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


def _say(text: str) -> None:
    """One line for the user on stderr (a notebook shows it under the cell); never raises."""
    try:
        stream = sys.stderr
        if stream is not None:
            stream.write(text + "\n")
            stream.flush()
    except Exception:
        pass


def parse_fraction(text: str | None) -> float | None:
    """The memory fraction in ``text`` as a float in (0, 1], or None if it is not one."""
    if text is None:
        return None
    try:
        value = float(text.strip())
    except (TypeError, ValueError, AttributeError):
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
    except (TypeError, ValueError, AttributeError):
        return None
    if value > 0.0 and value != float("inf"):
        return value
    return None


def _env_int(name: str) -> int | None:
    value = _parse_positive(os.environ.get(name))
    return int(value) if value is not None and value == int(value) else None


def activate(fraction_text: str | None = None) -> bool:
    """Install the import hook if the fraction (by default ``GPUSHARE_MEMORY_FRACTION``) is valid.

    The start-up hook passes the value it read when the interpreter started, so
    removing the variable later does not lift the cap. Idempotent and cheap;
    returns whether the hook is installed. Never raises.
    """
    try:
        return _activate(fraction_text)
    except Exception as exc:
        _warn("activate", f"not active ({exc.__class__.__name__}: {exc}); no memory cap")
        return False


def _activate(fraction_text: str | None) -> bool:
    state = _state()
    if state.finder is not None:
        return True
    raw = os.environ.get(FRACTION_ENV) if fraction_text is None else fraction_text
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
    """Meta path finder that wraps the loaders of the frameworks it caps.

    It finds nothing itself: it asks the finders after it for the real spec and
    swaps in a loader that runs the real one and then applies the cap.
    """

    def __init__(self, fraction: float) -> None:
        import _thread

        self.fraction = fraction
        self.pending = {
            "torch": _apply_torch,
            "tensorflow": _apply_tensorflow,
            "jax": _apply_jax,
            "cupy": _apply_cupy,
        }
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
            # every hook has fired: stop costing anything on later imports
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


# --- what the user is told -------------------------------------------------------


def _notices_on() -> bool:
    return os.environ.get(NOTICE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _gib(nbytes: float, approximate: bool = False) -> str:
    return f"{'about ' if approximate else ''}{nbytes / GiB:.1f} GiB"


def _share_facts() -> dict:
    return {
        "replicas": _env_int(REPLICAS_ENV),
        "slices": _env_int(SLICES_ENV),
        "sharing": os.environ.get(SHARING_ENV, "").strip().lower(),
    }


def _who_shares(replicas: int | None, slices: int | None) -> str:
    if not replicas:
        return "this GPU"
    text = f"this GPU, which up to {replicas} users share"
    if slices and slices > 1:
        text += f" (your server holds {slices} of its {replicas} slices)"
    return text


def notice_text(
    framework: str,
    cap_bytes: float | None,
    total_bytes: float | None,
    replicas: int | None,
    slices: int | None = 1,
    sharing: str = "",
    approximate: bool = False,
) -> str | None:
    """The line shown when ``framework`` starts using a shared GPU; None if it is not shared.

    ``cap_bytes`` is what the framework may take, ``total_bytes`` the GPU's memory
    (either may be unknown); ``approximate`` when the cap is a percentage of a
    total that CUDA will report a little lower than NVML does.
    """
    if not replicas or replicas < 2:
        return None
    name = _FRAMEWORK_NAMES.get(framework, framework)
    if slices and slices > 1:
        who = f"up to {replicas} users, and your server holds {slices} slices"
    else:
        who = f"up to {replicas} users"
    if cap_bytes:
        amount = _gib(cap_bytes, approximate)
        if total_bytes:
            amount += f" of its {_gib(total_bytes)}"
    else:
        amount = "its share"
    kind = (
        "a hard cap: the GPU itself refuses more"
        if sharing == "mps"
        else "a cooperative cap that keeps room for the others"
    )
    return f"gpushare: this GPU is shared by {who}: {name} may use {amount} ({kind})."


def oom_hint_text(
    framework: str,
    cap_bytes: float | None,
    at_cap: bool | None,
    replicas: int | None,
    slices: int | None = 1,
    sharing: str = "",
    approximate: bool = False,
) -> str:
    """What an out-of-memory error of ``framework`` means on a shared GPU, and what to do.

    ``at_cap``: True when the framework stopped at its cap, False when the GPU
    itself was full first, None when the error does not say.
    """
    name = _FRAMEWORK_NAMES.get(framework, framework)
    cap = f"its cap of {_gib(cap_bytes, approximate)}" if cap_bytes else "its cap"
    where = _who_shares(replicas, slices)
    advice = _FREE_ADVICE.get(framework, "use less memory")
    if sharing == "mps":
        # MPS gives every process one slice's memory, whatever the server asked for
        todo = f"To fit: {advice}, or restart other kernels that still hold GPU memory."
    else:
        todo = (
            f"To fit: {advice}, restart other kernels that still hold GPU memory, "
            "or start a server with more GPU slices."
        )
    if at_cap is False and sharing == "mps":
        # under MPS a process's own limit looks like a full GPU to the framework
        return (
            f"gpushare: {name} reached the memory limit that this GPU (MPS) sets for each "
            f"process, your share of {where}. {todo}"
        )
    if at_cap is False:
        return (
            f"gpushare: the GPU itself ran out of memory before {name} reached {cap}: "
            f"other processes on {where} hold more than their share. Try again later, "
            "and tell your JupyterHub admin if it keeps happening."
        )
    if at_cap:
        head = f"gpushare: {name} ran out of memory at {cap}, your share of {where}."
    else:
        head = f"gpushare: {name} ran out of GPU memory; {cap} is your share of {where}."
    if sharing == "mps":
        head += " On this GPU the share is a hard limit, for every library."
    return f"{head} {todo}"


def _notice(
    framework: str,
    cap_bytes: float | None,
    total_bytes: float | None,
    approximate: bool = False,
) -> None:
    """Tell the user their share, the first time a framework of this process uses the GPU."""
    try:
        state = _state()
        state.caps[framework] = (cap_bytes, approximate)
        _install_oom_hints()
        if state.noticed or not _notices_on():
            return
        state.noticed = True
        text = notice_text(
            framework, cap_bytes, total_bytes, approximate=approximate, **_share_facts()
        )
        if text:
            _say(text)
    except Exception:
        pass


def _oom_of(exc) -> tuple[str, object] | None:
    """The framework whose out-of-memory error ``exc`` is (or was caused by), and that error."""
    seen = 0
    while exc is not None and seen < 6:
        seen += 1
        for cls in type(exc).__mro__:
            module = (getattr(cls, "__module__", "") or "").split(".")[0]
            name = cls.__name__
            if module == "torch" and name == "OutOfMemoryError":
                return "torch", exc
            if module == "cupy" and name == "OutOfMemoryError":
                return "cupy", exc
            if module == "tensorflow" and name == "ResourceExhaustedError":
                return "tensorflow", exc
            if module in ("jax", "jaxlib") and "RESOURCE_EXHAUSTED" in str(exc):
                return "jax", exc
        exc = exc.__cause__ or exc.__context__
    return None


_SIZE_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def _at_cap(framework: str, message: str) -> bool | None:
    """Whether the error says the framework hit its own cap (not a full GPU), if it says."""
    if framework == "cupy":
        # the pool's limit: "... (limit set to: N bytes)"; the device: "Out of memory allocating"
        return "limit set to" in message
    if framework == "torch":
        import re

        tried = re.search(r"Tried to allocate ([\d.]+) (\w+)", message)
        free = re.search(r"of which ([\d.]+) (\w+) is free", message)
        if not (tried and free and tried.group(2) in _SIZE_UNITS and free.group(2) in _SIZE_UNITS):
            return None
        tried_bytes = float(tried.group(1)) * _SIZE_UNITS[tried.group(2)]
        free_bytes = float(free.group(1)) * _SIZE_UNITS[free.group(2)]
        # refused although the GPU had room: the per-process cap said no
        return free_bytes >= tried_bytes
    return None


def _cap_in_message(framework: str, message: str) -> float | None:
    """The cap the error itself states: CuPy's pool limit, PyTorch's "X GiB allowed"."""
    import re

    if framework == "cupy":
        found = re.search(r"limit set to: ([\d,]+) bytes", message)
        return float(found.group(1).replace(",", "")) if found else None
    if framework == "torch":
        found = re.search(r"([\d.]+) (\w+) allowed", message)
        if found and found.group(2) in _SIZE_UNITS:
            return float(found.group(1)) * _SIZE_UNITS[found.group(2)]
    return None


def _annotate(exc) -> None:
    """Add the hint to an out-of-memory error about to be shown, once per process."""
    try:
        state = _state()
        if state.hinted or exc is None or not _notices_on():
            return
        found = _oom_of(exc)
        if found is None:
            return
        framework, oom = found
        state.hinted = True
        message = str(oom)
        cap, approximate = state.caps.get(framework, (None, False))
        exact = _cap_in_message(framework, message)
        if exact:
            cap, approximate = exact, False
        text = oom_hint_text(
            framework,
            cap,
            _at_cap(framework, message),
            approximate=approximate,
            **_share_facts(),
        )
        add_note = getattr(exc, "add_note", None)
        if callable(add_note):
            # shown at the end of the traceback (Python 3.11+, IPython 8+)
            add_note(text)
        else:
            _say(text)
    except Exception:
        pass


def _install_oom_hints() -> None:
    """Wrap the two places that show uncaught errors: sys.excepthook and IPython's."""
    state = _state()
    if state.hooks:
        return
    state.hooks = True
    previous = sys.excepthook

    def excepthook(etype, value, tb):
        _annotate(value)
        previous(etype, value, tb)

    sys.excepthook = excepthook
    try:
        ipython = sys.modules.get("IPython")
        get_ipython = getattr(ipython, "get_ipython", None)
        shell = get_ipython() if callable(get_ipython) else None
        if shell is None or getattr(shell, "_gpushare_wrapped", False):
            return
        show = shell.showtraceback

        def showtraceback(exc_tuple=None, *args, **kwargs):
            value = exc_tuple[1] if exc_tuple else sys.exc_info()[1]
            _annotate(value if value is not None else getattr(sys, "last_value", None))
            return show(exc_tuple, *args, **kwargs)

        shell.showtraceback = showtraceback
        shell._gpushare_wrapped = True
    except Exception:
        pass


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


def _drop_unknown_alloc_options(torch) -> None:
    """Take allocator options out that this torch does not know, before CUDA starts.

    torch reads the variable at CUDA initialisation and would refuse the whole
    config. Options the spawner adds by default (``expandable_segments``) are
    an optimisation, so this is silent; ``state.applied`` records it.
    """
    version = _version_tuple(getattr(torch, "__version__", ""))
    if version is None:
        return
    for name in _ALLOC_CONF_ENVS:
        value = os.environ.get(name)
        if not value:
            continue
        too_new = [
            key
            for key in (_conf_key(entry) for entry in _conf_entries(value))
            if version < _TORCH_KEYS_SINCE.get(key, (0, 0))
        ]
        if not too_new:
            continue
        for key in too_new:
            value = _without_key(value, key)
        if value:
            os.environ[name] = value
        else:
            del os.environ[name]
        _state().applied["torch-alloc-conf"] = (
            f"removed {', '.join(too_new)} from {name} (torch {torch.__version__})"
        )


def _apply_torch(torch, fraction: float) -> None:
    state = _state()
    _drop_unknown_alloc_options(torch)
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
            return
        total = None
        try:
            total = float(cuda.get_device_properties(0).total_memory)
        except Exception:
            pass
        _notice("torch", fraction * total if total else None, total)

    lazy_call(apply_at_cuda_init)
    state.applied.setdefault("torch", "queued for CUDA initialisation")
    _install_oom_hints()


# --- JAX and CuPy: capped by their own variables; the guard only tells the user --


def _total_memory_bytes_quick() -> float | None:
    """The GPU's memory from the spawner's variable or NVML (no CUDA context, no subprocess)."""
    mib = _parse_positive(os.environ.get(MEMORY_MIB_ENV))
    if mib is None:
        try:
            mib = _nvml_total_mib()
        except Exception:
            mib = None
    return mib * 2**20 if mib else None


def _apply_jax(jax, fraction: float) -> None:
    # JAX preallocates XLA_PYTHON_CLIENT_MEM_FRACTION of the GPU at its first GPU use
    raw = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION") or os.environ.get(
        "XLA_CLIENT_MEM_FRACTION"
    )
    jax_fraction = parse_fraction(raw)
    if jax_fraction is None:
        return
    _state().applied["jax"] = f"XLA_PYTHON_CLIENT_MEM_FRACTION={raw}"
    total = _total_memory_bytes_quick() if _notices_on() else None
    # a fraction of what CUDA reports, a little less than NVML's total
    _notice("jax", jax_fraction * total if total else None, total, approximate=True)


def _apply_cupy(cupy, fraction: float) -> None:
    raw = (os.environ.get("CUPY_GPU_MEMORY_LIMIT") or "").strip()
    if not raw:
        return
    _state().applied["cupy"] = f"CUPY_GPU_MEMORY_LIMIT={raw}"
    total = _total_memory_bytes_quick() if _notices_on() else None
    if raw.endswith("%"):
        percent = _parse_positive(raw[:-1])
        cap = percent / 100 * total if percent and total else None
        _notice("cupy", cap, total, approximate=True)
    else:
        _notice("cupy", _parse_positive(raw), total)


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
    _notice("tensorflow", limit * 2.0**20, total * 2.0**20)


# --- start-up folder ---------------------------------------------------------


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def _own_source() -> str:
    try:
        return _read(__file__)
    except (OSError, NameError):
        import inspect

        return inspect.getsource(sys.modules[__name__])


def startup_files() -> dict[str, str]:
    """The start-up folder's files, ``{file name: text}``, for the spawner's ConfigMap.

    The folder goes first on the user's ``PYTHONPATH``. Its ``sitecustomize.py``
    (``startup/sitecustomize.py`` in this package) activates the guard (this
    module's source, shipped as ``gpushare_guard.py``) and then runs the image's
    own ``sitecustomize``, if any.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    return {
        "sitecustomize.py": _read(os.path.join(here, _STARTUP_FOLDER, "sitecustomize.py")),
        f"{_STARTUP_GUARD_NAME}.py": _own_source(),
    }
