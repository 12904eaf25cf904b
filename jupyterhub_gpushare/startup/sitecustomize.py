"""jupyterhub-gpushare start-up hook; GPUShareSpawner puts this folder first on PYTHONPATH.

The spawner ships this file, with the guard beside it as ``gpushare_guard.py``,
in the ConfigMap it mounts into GPU servers. Python imports it as
``sitecustomize`` at start-up. It

1. arms the GPU memory guard. The guard module is loaded only when a framework
   it caps (torch, tensorflow, jax, cupy) is about to be imported: the folder is
   usually a read-only ConfigMap, so Python cannot cache the guard's bytecode,
   and compiling it would cost every Python process a few milliseconds. The
   fraction is read here, once, so that a process cannot lift its own cap by
   removing the variable before it imports a framework;
2. runs the sitecustomize that Python would have run without this folder (the
   image's own), once.

Neither step may stop the interpreter: problems are reported on stderr. Like
the guard, this file runs in users' images: standard library only, Python 3.7
syntax.
"""

import os
import sys

_GPUSHARE_TARGETS = ("torch", "tensorflow", "jax", "cupy")
_GPUSHARE_FRACTION_ENV = "GPUSHARE_MEMORY_FRACTION"
_GPUSHARE_GUARD = "gpushare_guard"
_GPUSHARE_STATE = "_gpushare_guard_state"


def _gpushare_startup():
    here = os.path.dirname(os.path.realpath(__file__))
    marker = "_gpushare_sitecustomize_chain"
    if marker in sys.modules:
        # The image's sitecustomize we chained to has run this file again (it
        # chains too): the guard is already armed and chaining again would loop.
        return None
    raw = os.environ.get(_GPUSHARE_FRACTION_ENV, "").strip()
    if raw:
        try:
            _gpushare_arm(here, raw)
        except Exception as exc:
            _gpushare_report(exc)
    return _gpushare_chain(here, marker)


def _gpushare_report(exc):
    sys.stderr.write(
        f"gpushare guard: not active ({exc.__class__.__name__}: {exc}); no memory cap\n"
    )


def _gpushare_arm(here, raw):
    state = sys.modules.get(_GPUSHARE_STATE)
    if state is not None and state.finder is not None:
        # already active: the packaged guard, started by its .pth file
        return
    try:
        fraction = float(raw)
    except ValueError:
        fraction = 0.0
    if not 0.0 < fraction <= 1.0 or any(name in sys.modules for name in _GPUSHARE_TARGETS):
        # rare cases: the guard itself warns about the value, or caps now
        _gpushare_load_guard(here).activate(raw)
        return
    sys.meta_path.insert(0, _GPUShareLazyGuard(here, raw))


class _GPUShareLazyGuard:
    """Loads and activates the guard when a framework it caps is first looked for."""

    def __init__(self, here, raw):
        self.here = here
        self.raw = raw

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _GPUSHARE_TARGETS:
            return None
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
        try:
            if not _gpushare_load_guard(self.here).activate(self.raw):
                return None
            # the guard's own finder wraps the framework's loader
            finder = sys.modules[_GPUSHARE_STATE].finder
            return finder.find_spec(fullname, path, target)
        except Exception as exc:
            _gpushare_report(exc)
            return None

    def invalidate_caches(self):
        pass


def _gpushare_load_guard(here):
    guard = sys.modules.get(_GPUSHARE_GUARD)
    if guard is not None:
        return guard
    # importlib.machinery is nearly free here; importlib.util is not
    from importlib.machinery import ModuleSpec, SourceFileLoader

    path = os.path.join(here, _GPUSHARE_GUARD + ".py")
    loader = SourceFileLoader(_GPUSHARE_GUARD, path)
    guard = type(sys)(_GPUSHARE_GUARD)
    guard.__file__ = path
    guard.__loader__ = loader
    guard.__spec__ = ModuleSpec(_GPUSHARE_GUARD, loader, origin=path)
    sys.modules[_GPUSHARE_GUARD] = guard
    try:
        loader.exec_module(guard)
    except BaseException:
        del sys.modules[_GPUSHARE_GUARD]
        raise
    return guard


def _gpushare_is_startup_folder(path):
    # another copy of this folder (mounted twice, say) must not count as the image's
    return os.path.isfile(os.path.join(path, _GPUSHARE_GUARD + ".py")) and os.path.isfile(
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
        sys.stderr.write(f"gpushare guard: could not look for the image's sitecustomize ({exc})\n")
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
                "Error in sitecustomize; set PYTHONVERBOSE for traceback:\n"
                f"{err.__class__.__name__}: {err}\n"
            )
    finally:
        sys.modules.pop(marker, None)
    return spec.origin


if __name__ == "sitecustomize":
    # the file of the image's sitecustomize that was run, or None
    gpushare_chained = _gpushare_startup()
