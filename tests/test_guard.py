"""The in-container memory guard, in real interpreters with stand-in frameworks.

Each test starts a fresh Python the way a user's server would be started: the
start-up folder from ``startup_files()`` first on PYTHONPATH, then a folder with
tiny stand-ins for torch, tensorflow, jax and cupy that write what is done to
them to a JSON-lines log. No GPU, no cluster, no real framework. Where the
stand-ins and the real frameworks could differ (when torch reads its allocator
options, what the notice and the out-of-memory hint look like in real output),
``benchmarks/gpu_memory_guard.py`` measures the real ones on a GPU.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jupyterhub_gpushare import guard
from jupyterhub_gpushare.objects import GPUShare

# A user image's interpreter: the base Python, without this venv's site-packages
# (where the installed package's .pth would start the guard on its own).
PYTHON = getattr(sys, "_base_executable", sys.executable)
REPO = Path(__file__).resolve().parents[1]

FAKE_TORCH = '''\
"""Stand-in for torch: logs to $FAKE_TORCH_LOG."""
import json
import os

__version__ = os.environ.get("FAKE_TORCH_VERSION", "2.11.0")


def _record(event, **data):
    with open(os.environ["FAKE_TORCH_LOG"], "a") as log:
        log.write(json.dumps({"event": event, **data}) + "\\n")


_record("import torch")


class OutOfMemoryError(RuntimeError):
    """torch.OutOfMemoryError (= torch.cuda.OutOfMemoryError)."""


OutOfMemoryError.__module__ = "torch"

from torch import cuda  # noqa: E402  (real torch imports torch.cuda while importing)
'''

FAKE_TORCH_CUDA = '''\
"""Stand-in for torch.cuda with the lazy-initialisation protocol of real torch."""
import os

from torch import _record

_BREAK = os.environ.get("FAKE_TORCH_BREAK", "")
_initialized = False
_initializing = False
_queued_calls = []


class DeferredCudaCallError(Exception):
    pass


def is_initialized():
    return _initialized


def device_count():
    return int(os.environ.get("FAKE_TORCH_DEVICES", "1"))


def _lazy_call(callable, **kwargs):
    if _BREAK == "lazy_call":
        raise RuntimeError("stand-in _lazy_call is broken")
    _record("lazy_call")
    if _initialized:
        callable()
    else:
        _queued_calls.append(callable)


def _lazy_init():
    # like torch: the allocator config is read here, queued calls run here, and
    # an exception from a queued call makes CUDA initialisation fail
    global _initialized, _initializing
    if _initialized or _initializing:
        return
    _initializing = True
    _record("cuda_init", alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    try:
        for call in _queued_calls:
            try:
                call()
            except Exception as e:
                raise DeferredCudaCallError(f"CUDA call failed lazily: {e}") from e
    finally:
        _initializing = False
    _initialized = True


class _Properties:
    def __init__(self, total_memory):
        self.total_memory = total_memory


def get_device_properties(device=None):
    if _BREAK == "properties":
        raise RuntimeError("stand-in get_device_properties is broken")
    # an H200 as torch reports it
    return _Properties(int(os.environ.get("FAKE_TORCH_TOTAL", "150109880320")))


def set_per_process_memory_fraction(fraction, device=None):
    _lazy_init()
    if _BREAK == "set_fraction":
        raise RuntimeError("stand-in set_per_process_memory_fraction is broken")
    if not isinstance(fraction, float):
        raise TypeError("Invalid type for fraction argument, must be `float`")
    _record("set_fraction", fraction=fraction, type=type(fraction).__name__, device=device)


if _BREAK == "no_lazy_call":
    del _lazy_call
'''

FAKE_TENSORFLOW = '''\
"""Stand-in for tensorflow.config: logs to $FAKE_TORCH_LOG."""
import json
import os
from collections import namedtuple
from types import SimpleNamespace

PhysicalDevice = namedtuple("PhysicalDevice", "name device_type")


def _record(event, **data):
    with open(os.environ["FAKE_TORCH_LOG"], "a") as log:
        log.write(json.dumps({"event": event, **data}) + "\\n")


class LogicalDeviceConfiguration:
    def __init__(self, memory_limit=None):
        self.memory_limit = memory_limit


def list_physical_devices(device_type=None):
    count = int(os.environ.get("FAKE_TF_GPUS", "1"))
    return [PhysicalDevice(f"/physical_device:GPU:{i}", "GPU") for i in range(count)]


def set_logical_device_configuration(device, logical_devices):
    _record("logical", device=device.name, limits=[d.memory_limit for d in logical_devices])


_record("import tensorflow")
config = SimpleNamespace(
    list_physical_devices=list_physical_devices,
    set_logical_device_configuration=set_logical_device_configuration,
    LogicalDeviceConfiguration=LogicalDeviceConfiguration,
)
'''

FAKE_JAX = '''"""Stand-in for jax: its out-of-memory error comes from jaxlib."""
import json
import os

with open(os.environ["FAKE_TORCH_LOG"], "a") as log:
    log.write(json.dumps({"event": "import jax"}) + "\\n")


class JaxRuntimeError(RuntimeError):
    pass


JaxRuntimeError.__module__ = "jaxlib._jax"
'''

FAKE_CUPY = '''"""Stand-in for cupy."""
import json
import os

with open(os.environ["FAKE_TORCH_LOG"], "a") as log:
    log.write(json.dumps({"event": "import cupy"}) + "\\n")
'''

# A process that looks at the guard from the inside and prints it as JSON.
REPORT = """
import json, sys
print(json.dumps({
    "torch_loaded": "torch" in sys.modules,
    "guard_finders": sum(
        type(f).__name__ in ("_GuardFinder", "_GPUShareLazyGuard") for f in sys.meta_path
    ),
    "guard_loaded": "gpushare_guard" in sys.modules,
    "applied": getattr(sys.modules.get("_gpushare_guard_state"), "applied", None),
}))
"""


class Harness:
    """Runs Python the way the spawner will, and reads the stand-ins' log."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.startup = root / "startup"
        self.startup.mkdir()
        for name, text in guard.startup_files().items():
            (self.startup / name).write_text(text)
        self.fakes = root / "fakes"
        (self.fakes / "torch" / "cuda").mkdir(parents=True)
        (self.fakes / "torch" / "__init__.py").write_text(FAKE_TORCH)
        (self.fakes / "torch" / "cuda" / "__init__.py").write_text(FAKE_TORCH_CUDA)
        (self.fakes / "tensorflow").mkdir()
        (self.fakes / "tensorflow" / "__init__.py").write_text(FAKE_TENSORFLOW)
        (self.fakes / "jax").mkdir()
        (self.fakes / "jax" / "__init__.py").write_text(FAKE_JAX)
        (self.fakes / "cupy").mkdir()
        (self.fakes / "cupy" / "__init__.py").write_text(FAKE_CUPY)
        self.log = root / "calls.jsonl"

    def run(
        self,
        code: str,
        env: dict[str, str] | None = None,
        path: list[Path] | None = None,
        args: tuple[str, ...] = (),
    ) -> subprocess.CompletedProcess[str]:
        environ = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("GPUSHARE_", "PYTORCH_", "FAKE_", "PYTHON", "XLA_", "CUPY_"))
        }
        environ["FAKE_TORCH_LOG"] = str(self.log)
        entries = [self.startup, self.fakes] if path is None else path
        environ["PYTHONPATH"] = os.pathsep.join(str(p) for p in entries)
        environ.update(env or {})
        return subprocess.run(
            [PYTHON, *args, "-c", code],
            env=environ,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def events(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def names(self) -> list[str]:
        return [event["event"] for event in self.events()]


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    return result


def guard_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if "gpushare guard" in line]


FRACTION = {"GPUSHARE_MEMORY_FRACTION": "0.2344"}


# --- pure functions ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.2344", 0.2344),
        (" 0.25\n", 0.25),
        ("1", 1.0),
        ("1e-3", 0.001),
        ("0", None),
        ("-0.25", None),
        ("1.0001", None),
        ("nan", None),
        ("inf", None),
        ("25%", None),
        ("", None),
        ("a quarter", None),
        (None, None),
    ],
)
def test_parse_fraction_examples(text, expected):
    assert guard.parse_fraction(text) == expected


@given(st.floats(min_value=0.0, max_value=1.0, exclude_min=True))
def test_parse_fraction_round_trips_every_valid_float(value):
    parsed = guard.parse_fraction(repr(value))
    assert parsed == value
    assert type(parsed) is float


@given(st.text())
def test_parse_fraction_never_raises_and_stays_in_range(text):
    parsed = guard.parse_fraction(text)
    assert parsed is None or 0.0 < parsed <= 1.0


_conf_values = st.one_of(
    st.sampled_from(["True", "False", "native", "cudaMallocAsync", "0.8", "512"]),
    # roundup_power2_divisions takes a list with commas and colons inside brackets
    st.lists(
        st.tuples(st.sampled_from(["64", "256", ">"]), st.integers(1, 8)), min_size=1, max_size=3
    ).map(lambda pairs: "[" + ",".join(f"{k}:{v}" for k, v in pairs) + "]"),
)
_conf_entries = st.lists(
    st.tuples(
        st.sampled_from(
            ["expandable_segments", "max_split_size_mb", "roundup_power2_divisions", "backend"]
        ),
        _conf_values,
    ).map(lambda kv: f"{kv[0]}:{kv[1]}"),
    max_size=4,
)


@given(_conf_entries, st.integers(0, 4), st.sampled_from(["0.25", "1", "0.0625"]))
def test_alloc_conf_key_removal_keeps_every_other_entry(entries, position, value):
    with_key = list(entries)
    with_key.insert(min(position, len(entries)), f"per_process_memory_fraction:{value}")
    conf = ",".join(with_key)
    assert guard._conf_entries(conf) == with_key
    assert guard._without_key(conf, "per_process_memory_fraction") == ",".join(entries)


@pytest.mark.parametrize(
    ("version", "expected"),
    [("2.11.0+cu130", (2, 11)), ("2.9.1", (2, 9)), ("2.10.0a0+git1234", (2, 10)), ("x", None)],
)
def test_version_tuple(version, expected):
    assert guard._version_tuple(version) == expected


def test_startup_files_ship_the_guard_itself_and_only_need_the_stdlib():
    files = guard.startup_files()
    assert set(files) == {"sitecustomize.py", "gpushare_guard.py"}
    assert files["gpushare_guard.py"] == Path(guard.__file__).read_text()
    # a real file of the package, linted like the rest
    startup = Path(guard.__file__).parent / "startup" / "sitecustomize.py"
    assert files["sitecustomize.py"] == startup.read_text()
    for name, text in files.items():
        # user images may run an older Python than the hub: keep to 3.7 syntax
        tree = ast.parse(text, name, feature_version=(3, 7))
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{name} uses a relative import"
                imported.add((node.module or "").split(".")[0])
        imported.discard("__future__")
        assert imported <= set(sys.stdlib_module_names), (name, imported)


def test_total_memory_prefers_the_env_then_nvml_then_nvidia_smi(monkeypatch):
    calls = []
    monkeypatch.setattr(guard, "_nvml_total_mib", lambda: calls.append("nvml"))
    monkeypatch.setattr(guard, "_nvidia_smi_total_mib", lambda: calls.append("smi") or 143771.0)
    monkeypatch.setenv(guard.MEMORY_MIB_ENV, "81559")
    assert guard._total_memory_mib() == 81559.0
    assert calls == []
    monkeypatch.delenv(guard.MEMORY_MIB_ENV)
    assert guard._total_memory_mib() == 143771.0
    assert calls == ["nvml", "smi"]
    monkeypatch.setattr(guard, "_nvidia_smi_total_mib", lambda: 1 / 0)
    assert guard._total_memory_mib() is None


# --- start-up and the import hook ------------------------------------------------


def test_startup_imports_no_framework_and_initialises_no_cuda(harness):
    result = ok(harness.run(REPORT, env=FRACTION))
    report = json.loads(result.stdout)
    # armed, but the guard module itself is only loaded once torch is looked for
    assert report == {
        "torch_loaded": False,
        "guard_finders": 1,
        "guard_loaded": False,
        "applied": None,
    }
    assert harness.events() == []
    assert result.stderr == ""


def test_startup_adds_only_a_few_small_modules(harness):
    code = "import sys; print(sorted(sys.modules))"
    baseline = set(json.loads(ok(harness.run(code, path=[harness.fakes])).stdout.replace("'", '"')))
    guarded = set(json.loads(ok(harness.run(code, env=FRACTION)).stdout.replace("'", '"')))
    added = guarded - baseline
    assert "sitecustomize" in added
    # not even the guard (its bytecode cannot be cached in a read-only ConfigMap);
    # nothing heavy: no ctypes, subprocess, logging, threading, re, importlib.util
    allowed = {
        "sitecustomize",
        "importlib",
        "importlib._bootstrap",
        "importlib._bootstrap_external",
        "importlib.machinery",
        "warnings",
    }
    assert added <= allowed, added - allowed


def test_startup_without_a_fraction_does_not_even_load_the_guard(harness):
    code = "import sys; print('gpushare_guard' in sys.modules, 'sitecustomize' in sys.modules)"
    result = ok(harness.run(code))
    assert result.stdout == "False True\n"
    assert result.stderr == ""


def test_torch_import_queues_the_cap_and_cuda_init_applies_it(harness):
    code = (
        "import torch, sys\n"
        "assert not torch.cuda.is_initialized()\n"
        "print(len(torch.cuda._queued_calls))\n"
        "torch.cuda._lazy_init()\n"
        "print(sys.modules['_gpushare_guard_state'].applied['torch'])\n"
    )
    result = ok(harness.run(code, env={**FRACTION, "FAKE_TORCH_DEVICES": "2"}))
    queued, applied = result.stdout.splitlines()
    assert queued == "1"
    assert applied == "set_per_process_memory_fraction(0.2344) x2"
    assert harness.names() == [
        "import torch",
        "lazy_call",
        "cuda_init",
        "set_fraction",
        "set_fraction",
    ]
    sets = [e for e in harness.events() if e["event"] == "set_fraction"]
    assert [(e["fraction"], e["type"], e["device"]) for e in sets] == [
        (0.2344, "float", 0),
        (0.2344, "float", 1),
    ]
    assert result.stderr == ""


def test_torch_only_ever_sees_its_real_loader(harness):
    # the fake records the loader that torch's own code saw while it ran
    code = (
        "import importlib, torch\n"
        "print(type(torch.__loader__).__name__, type(torch.__spec__.loader).__name__)\n"
        "importlib.reload(torch)\n"
    )
    result = ok(harness.run(code, env=FRACTION))
    assert result.stdout == "SourceFileLoader SourceFileLoader\n"
    # the reload ran torch's code again, without a second hook
    assert harness.names() == ["import torch", "lazy_call", "import torch"]


def test_no_fraction_means_no_hook_and_torch_untouched(harness):
    result = ok(harness.run("import torch; torch.cuda._lazy_init()\n" + REPORT))
    report = json.loads(result.stdout)
    assert report["guard_finders"] == 0
    assert harness.names() == ["import torch", "cuda_init"]
    assert result.stderr == ""


def test_process_without_torch_is_untouched(harness):
    code = (
        "import json, email.message, sys\n"
        "print(json.dumps(['torch' in sys.modules, 'gpushare_guard' in sys.modules]))"
    )
    result = ok(harness.run(code, env=FRACTION))
    assert result.stdout == "[false, false]\n"
    assert result.stderr == ""
    assert harness.events() == []


def test_looking_for_torch_imports_nothing_and_the_real_import_is_still_capped(harness):
    # transformers and others call importlib.util.find_spec("torch") to probe
    code = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('torch') is not None\n"
        "print('torch' in sys.modules)\n"
        "import torch\n" + REPORT
    )
    result = ok(harness.run(code, env=FRACTION))
    probed, report = result.stdout.splitlines()
    assert probed == "False"
    assert json.loads(report)["applied"] == {"torch": "queued for CUDA initialisation"}
    assert harness.names() == ["import torch", "lazy_call"]


def test_hook_removes_itself_once_every_framework_is_capped(harness):
    code = "import torch, tensorflow, jax, cupy\n" + REPORT
    result = ok(harness.run(code, env={**FRACTION, "GPUSHARE_GPU_MEMORY_MIB": "1000"}))
    assert json.loads(result.stdout)["guard_finders"] == 0
    assert "lazy_call" in harness.names()
    assert "logical" in harness.names()


def test_torch_imported_before_activation_is_capped_on_activation(harness):
    # the fraction appears only after torch is imported, so a .pth file that
    # activated the guard at start-up (if installed) found nothing to do
    code = (
        "import os, torch, gpushare_guard\n"
        "before = list(torch.cuda._queued_calls)\n"
        "os.environ['GPUSHARE_MEMORY_FRACTION'] = '0.5'\n"
        "assert gpushare_guard.activate()\n"
        "assert gpushare_guard.activate()\n"
        "print(len(before), len(torch.cuda._queued_calls))\n"
        "torch.cuda._lazy_init()\n"
    )
    result = ok(harness.run(code))
    assert result.stdout == "0 1\n"
    sets = [e for e in harness.events() if e["event"] == "set_fraction"]
    assert [e["fraction"] for e in sets] == [0.5]


def test_activate_is_idempotent_across_both_copies_of_the_guard(harness):
    code = (
        "import sys, gpushare_guard\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import jupyterhub_gpushare.guard as packaged\n"
        "assert packaged is not gpushare_guard\n"
        "print(packaged.activate(), gpushare_guard.activate(), packaged.activate())\n"
        "import torch\n" + REPORT
    )
    result = ok(harness.run(code, env=FRACTION))
    first, report = result.stdout.splitlines()
    assert first == "True True True"
    assert json.loads(report)["guard_finders"] == 1
    assert harness.names().count("lazy_call") == 1


def test_fork_after_import_leaves_cuda_uninitialised_in_the_child(harness):
    # what a DataLoader with fork workers relies on
    code = (
        "import os, torch\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(3 if torch.cuda.is_initialized() else 0)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print(os.waitstatus_to_exitcode(status))\n"
    )
    result = ok(harness.run(code, env=FRACTION))
    assert result.stdout == "0\n"
    assert "cuda_init" not in harness.names()


# --- failures only warn ------------------------------------------------------------


def test_broken_lazy_call_warns_once_and_the_process_goes_on(harness):
    code = "import torch\nimport torch\nprint('user code ran')"
    result = ok(harness.run(code, env={**FRACTION, "FAKE_TORCH_BREAK": "lazy_call"}))
    assert result.stdout == "user code ran\n"
    lines = guard_lines(result)
    assert len(lines) == 1
    assert "stand-in _lazy_call is broken" in lines[0]


def test_failing_set_fraction_does_not_break_cuda_initialisation(harness):
    code = "import torch\ntorch.cuda._lazy_init()\nprint(torch.cuda.is_initialized())"
    result = ok(harness.run(code, env={**FRACTION, "FAKE_TORCH_BREAK": "set_fraction"}))
    assert result.stdout == "True\n"
    lines = guard_lines(result)
    assert len(lines) == 1
    assert "set_per_process_memory_fraction failed" in lines[0]


def test_torch_without_lazy_call_is_left_alone_with_a_warning(harness):
    code = "import torch\ntorch.cuda._lazy_init()\nprint('ok')"
    result = ok(harness.run(code, env={**FRACTION, "FAKE_TORCH_BREAK": "no_lazy_call"}))
    assert result.stdout == "ok\n"
    assert "set_fraction" not in harness.names()
    assert len(guard_lines(result)) == 1
    assert "_lazy_call" in guard_lines(result)[0]


@pytest.mark.parametrize("value", ["1.7", "0", "a quarter", "nan"])
def test_bad_fraction_warns_once_and_caps_nothing(harness, value):
    code = "import gpushare_guard\ngpushare_guard.activate()\nimport torch\n" + REPORT
    result = ok(harness.run(code, env={"GPUSHARE_MEMORY_FRACTION": value}))
    assert json.loads(result.stdout)["guard_finders"] == 0
    lines = guard_lines(result)
    assert len(lines) == 1
    assert repr(value) in lines[0]
    assert "lazy_call" not in harness.names()


def test_warnings_as_errors_still_only_warn(harness):
    result = ok(
        harness.run(
            "print('ran')",
            env={"GPUSHARE_MEMORY_FRACTION": "2"},
            args=("-W", "error"),
        )
    )
    assert result.stdout == "ran\n"
    assert len(guard_lines(result)) == 1


@pytest.mark.parametrize("damage", ["missing", "syntax error", "raises"])
def test_broken_guard_module_warns_and_the_image_sitecustomize_still_runs(harness, damage):
    module = harness.startup / "gpushare_guard.py"
    if damage == "missing":
        module.unlink()
    elif damage == "syntax error":
        module.write_text("def broken(:\n")
    else:
        module.write_text("raise RuntimeError('guard exploded')\n")
    image = harness.root / "image"
    image.mkdir()
    marker = harness.root / "image-ran"
    (image / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'a').write('x')\n")
    code = "import torch\nimport torch\nprint('user code ran')"
    result = ok(harness.run(code, env=FRACTION, path=[harness.startup, harness.fakes, image]))
    assert result.stdout == "user code ran\n"
    assert marker.read_text() == "x"
    # the guard is loaded when torch is looked for, so that is when it fails
    assert len(guard_lines(result)) == 1
    assert "not active" in guard_lines(result)[0]
    assert harness.names() == ["import torch"]


# --- PyTorch allocator configuration ---------------------------------------------


def test_fraction_in_alloc_conf_and_the_guard_call_both_apply(harness):
    # the allocator key alone is not enforced under backend:cudaMallocAsync
    # (measured), so the guard makes its call whatever the allocator options say
    conf = "expandable_segments:True,per_process_memory_fraction:0.25"
    code = "import torch\ntorch.cuda._lazy_init()\n" + REPORT
    result = ok(harness.run(code, env={**FRACTION, "PYTORCH_CUDA_ALLOC_CONF": conf}))
    assert json.loads(result.stdout)["applied"] == {
        "torch": "set_per_process_memory_fraction(0.2344) x1"
    }
    cuda_init = next(e for e in harness.events() if e["event"] == "cuda_init")
    assert cuda_init["alloc_conf"] == conf
    assert [e["fraction"] for e in harness.events() if e["event"] == "set_fraction"] == [0.2344]
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("version", "conf", "seen"),
    [
        # the spawner's default and the optional fraction key, on every version
        ("2.11.0+cu130", "expandable_segments:True", "expandable_segments:True"),
        (
            "2.9.1+cu128",
            "expandable_segments:True,per_process_memory_fraction:0.25",
            "expandable_segments:True",
        ),
        ("2.0.1", "expandable_segments:True,max_split_size_mb:512", "max_split_size_mb:512"),
        ("2.0.1", "expandable_segments:True", None),
        (
            "1.13.1",
            "backend:cudaMallocAsync,garbage_collection_threshold:0.8",
            "garbage_collection_threshold:0.8",
        ),
        # a version the guard cannot read is left alone
        ("nightly", "expandable_segments:True", "expandable_segments:True"),
    ],
)
def test_options_older_torch_does_not_know_are_removed_before_cuda_starts(
    harness, version, conf, seen
):
    code = "import torch\ntorch.cuda._lazy_init()"
    env = {**FRACTION, "PYTORCH_CUDA_ALLOC_CONF": conf, "FAKE_TORCH_VERSION": version}
    result = ok(harness.run(code, env=env))
    cuda_init = next(e for e in harness.events() if e["event"] == "cuda_init")
    assert cuda_init["alloc_conf"] == seen
    sets = [e["fraction"] for e in harness.events() if e["event"] == "set_fraction"]
    assert sets == [0.2344]
    # silent: the process works, with or without the optimisation
    assert result.stderr == ""


def test_cuda_malloc_async_is_capped_by_the_guard_call_without_a_warning(harness):
    code = "import torch\ntorch.cuda._lazy_init()\nimport torch"
    env = {**FRACTION, "PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}
    result = ok(harness.run(code, env=env))
    assert result.stderr == ""
    assert "set_fraction" in harness.names()


def test_native_backend_does_not_warn(harness):
    env = {**FRACTION, "PYTORCH_CUDA_ALLOC_CONF": "backend:native,expandable_segments:True"}
    result = ok(harness.run("import torch\ntorch.cuda._lazy_init()", env=env))
    assert result.stderr == ""
    assert "set_fraction" in harness.names()


def test_removing_the_fraction_variable_before_import_does_not_lift_the_cap(harness):
    # the start-up hook read it when the interpreter started
    code = (
        "import os\n"
        "del os.environ['GPUSHARE_MEMORY_FRACTION']\n"
        "import torch\n"
        "torch.cuda._lazy_init()\n"
    )
    ok(harness.run(code, env=FRACTION))
    assert [e["fraction"] for e in harness.events() if e["event"] == "set_fraction"] == [0.2344]


# --- what the user is told ---------------------------------------------------------

# What the spawner sets for one slice of an H200 shared four ways.
SHARED = {
    "GPUSHARE_MEMORY_FRACTION": "0.2447",
    "GPUSHARE_GPU_SLICES": "1",
    "GPUSHARE_GPU_REPLICAS": "4",
    "GPUSHARE_GPU_MEMORY_MIB": "143771",
    "GPUSHARE_SHARING": "time-slicing",
    "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.2447",
    "CUPY_GPU_MEMORY_LIMIT": "24.47%",
}
NOTICE = "gpushare: this GPU is shared by up to 4 users"
# torch's own message when the per-process cap refuses an allocation
TORCH_CAP_OOM = (
    "CUDA out of memory. Tried to allocate 36.10 GiB. GPU 0 has a total capacity of "
    "139.80 GiB of which 104.30 GiB is free. 34.21 GiB allowed; 0.01 GiB allocated"
)


def notice_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith(NOTICE)]


def hint_lines(text: str) -> list[str]:
    return [
        line
        for line in text.splitlines()
        if line.startswith("gpushare:") and not line.startswith(NOTICE)
    ]


def test_the_notice_appears_once_at_the_first_gpu_use(harness):
    code = (
        "import torch\n"
        "print('imported', flush=True)\n"
        "torch.cuda._lazy_init()\n"
        "torch.cuda._lazy_init()\n"
        "import jax, cupy\n"
    )
    result = ok(harness.run(code, env=SHARED))
    assert result.stdout == "imported\n"
    assert notice_lines(result) == [
        "gpushare: this GPU is shared by up to 4 users: PyTorch may use 34.2 GiB of its "
        "139.8 GiB (a cooperative cap that keeps room for the others)."
    ]
    assert result.stderr == notice_lines(result)[0] + "\n"


def test_no_notice_before_cuda_starts(harness):
    result = ok(harness.run("import torch", env=SHARED))
    assert result.stderr == ""


def test_the_notice_names_jax_when_jax_comes_first(harness):
    result = ok(harness.run("import jax, torch\ntorch.cuda._lazy_init()", env=SHARED))
    assert notice_lines(result) == [
        # a fraction of what CUDA will report, a little less than the GPU's label says
        "gpushare: this GPU is shared by up to 4 users: JAX may use about 34.4 GiB of its "
        "140.4 GiB (a cooperative cap that keeps room for the others)."
    ]


def test_the_notice_says_hard_cap_under_mps_and_counts_slices(harness):
    env = {**SHARED, "GPUSHARE_SHARING": "mps", "GPUSHARE_GPU_SLICES": "2"}
    result = ok(harness.run("import cupy", env=env))
    assert notice_lines(result) == [
        "gpushare: this GPU is shared by up to 4 users, and your server holds 2 slices: "
        "CuPy may use about 34.4 GiB of its 140.4 GiB (a hard cap: the GPU itself refuses more)."
    ]


@pytest.mark.parametrize("value", ["0", "off", "false"])
def test_the_admin_can_switch_notice_and_hint_off(harness, value):
    code = "import torch\ntorch.cuda._lazy_init()\nraise torch.OutOfMemoryError(MESSAGE)\n"
    code = code.replace("MESSAGE", repr(TORCH_CAP_OOM))
    result = harness.run(code, env={**SHARED, "GPUSHARE_NOTICE": value})
    assert result.returncode == 1
    assert "OutOfMemoryError" in result.stderr
    assert "gpushare" not in result.stderr
    # the cap itself stays
    assert "set_fraction" in harness.names()


def test_no_notice_where_the_gpu_is_not_shared(harness):
    env = {**SHARED, "GPUSHARE_GPU_REPLICAS": "1", "GPUSHARE_MEMORY_FRACTION": "0.99"}
    result = ok(harness.run("import torch\ntorch.cuda._lazy_init()", env=env))
    assert result.stderr == ""


@pytest.mark.parametrize(
    "breakage",
    [
        # no stderr at all (pythonw, some daemons)
        "import sys; sys.stderr = None\n",
        # a stderr that fails
        "import sys\nclass Broken:\n    def write(self, text): raise OSError('gone')\n"
        "    def flush(self): pass\nsys.stderr = Broken()\n",
        # notices and hints off is not the point here: the size is unknown
        "import os; os.environ['FAKE_TORCH_BREAK'] = 'properties'\n",
    ],
)
def test_the_notice_never_raises(harness, breakage):
    code = breakage + "import torch\ntorch.cuda._lazy_init()\nprint(torch.cuda.is_initialized())"
    result = ok(harness.run(code, env=SHARED))
    assert result.stdout == "True\n"
    assert [e["fraction"] for e in harness.events() if e["event"] == "set_fraction"] == [0.2447]


def test_an_uncaught_out_of_memory_error_carries_the_hint_once(harness):
    code = (
        "import torch\n"
        "torch.cuda._lazy_init()\n"
        "try:\n"
        "    raise torch.OutOfMemoryError(MESSAGE)\n"
        "except torch.OutOfMemoryError:\n"
        "    pass  # caught by the user's code: nothing to say\n"
        "raise torch.OutOfMemoryError(MESSAGE)\n"
    ).replace("MESSAGE", repr(TORCH_CAP_OOM))
    result = harness.run(code, env=SHARED)
    assert result.returncode == 1
    assert result.stderr.count("OutOfMemoryError") == 1
    hints = hint_lines(result.stderr)
    assert len(hints) == 1
    assert hints[0].startswith(
        "gpushare: PyTorch ran out of memory at its cap of 34.2 GiB, your share of this GPU, "
        "which up to 4 users share."
    )
    assert "torch.cuda.empty_cache()" in hints[0]
    # after the traceback, as a note of the error
    assert result.stderr.rstrip().endswith(hints[0])


def test_a_full_gpu_is_told_apart_from_the_cap(harness):
    full = TORCH_CAP_OOM.replace("of which 104.30 GiB is free", "of which 1.20 GiB is free")
    code = "import torch\ntorch.cuda._lazy_init()\nraise torch.OutOfMemoryError(MESSAGE)"
    result = harness.run(code.replace("MESSAGE", repr(full)), env=SHARED)
    (hint,) = hint_lines(result.stderr)
    assert hint.startswith("gpushare: the GPU itself ran out of memory before PyTorch reached")
    assert "hold more than their share" in hint


def test_under_mps_a_full_gpu_is_the_process_limit(harness):
    # measured: under MPS, torch sees its pinned limit as the GPU's free memory
    full = TORCH_CAP_OOM.replace("of which 104.30 GiB is free", "of which 34.93 GiB is free")
    code = "import torch\ntorch.cuda._lazy_init()\nraise torch.OutOfMemoryError(MESSAGE)"
    env = {**SHARED, "GPUSHARE_SHARING": "mps"}
    result = harness.run(code.replace("MESSAGE", repr(full)), env=env)
    (hint,) = hint_lines(result.stderr)
    assert hint.startswith(
        "gpushare: PyTorch reached the memory limit that this GPU (MPS) sets for each process"
    )
    # more slices would not help: MPS gives every process one slice
    assert "more GPU slices" not in hint


def test_an_out_of_memory_error_wrapped_in_another_still_gets_the_hint(harness):
    code = (
        "import torch\n"
        "torch.cuda._lazy_init()\n"
        "try:\n"
        "    raise torch.OutOfMemoryError(MESSAGE)\n"
        "except torch.OutOfMemoryError as e:\n"
        "    raise RuntimeError('training step failed') from e\n"
    ).replace("MESSAGE", repr(TORCH_CAP_OOM))
    result = harness.run(code, env=SHARED)
    assert len(hint_lines(result.stderr)) == 1
    assert "RuntimeError: training step failed" in result.stderr


def test_jax_out_of_memory_gets_the_hint(harness):
    code = (
        "import jax\n"
        "raise jax.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to "
        "allocate 38654705664 bytes.')\n"
    )
    result = harness.run(code, env=SHARED)
    (hint,) = hint_lines(result.stderr)
    assert hint.startswith("gpushare: JAX ran out of GPU memory; its cap of about 34.4 GiB is")


def test_cupy_out_of_memory_names_the_limit_cupy_states(harness):
    code = (
        "import cupy\n"
        "class OutOfMemoryError(RuntimeError):\n"
        "    pass\n"
        "OutOfMemoryError.__module__ = 'cupy.cuda.memory'\n"
        "raise OutOfMemoryError('Out of memory allocating 38,762,446,848 bytes (allocated so "
        "far: 512 bytes, limit set to: 36,731,887,714 bytes).')\n"
    )
    result = harness.run(code, env=SHARED)
    (hint,) = hint_lines(result.stderr)
    assert hint.startswith("gpushare: CuPy ran out of memory at its cap of 34.2 GiB, your share")
    assert "free_all_blocks()" in hint


def test_other_errors_are_left_alone(harness):
    code = "import torch\ntorch.cuda._lazy_init()\nraise ValueError('not about memory')"
    result = harness.run(code, env=SHARED)
    assert result.returncode == 1
    assert hint_lines(result.stderr) == []
    assert result.stderr.rstrip().endswith("ValueError: not about memory")


# A notebook cell as IPython runs it: the real InteractiveShell (the one
# ipykernel builds on), with the stand-in torch.
IPYTHON_CELLS = """
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance(colors="nocolor")
cells = [
    "import torch",
    "torch.cuda._lazy_init()",
    "raise torch.OutOfMemoryError(MESSAGE)",
    "raise ValueError('something else')",
    "raise torch.OutOfMemoryError(MESSAGE)",
    "print('still running')",
]
for cell in cells:
    shell.run_cell(cell)
    print("--- cell done", flush=True)
"""


def test_in_a_notebook_the_hint_is_in_the_cell_output_once(harness):
    import IPython

    site = Path(IPython.__file__).parents[1]
    code = IPYTHON_CELLS.replace("MESSAGE", repr(repr(TORCH_CAP_OOM))[1:-1])
    result = ok(
        harness.run(
            code,
            env={**SHARED, "IPYTHONDIR": str(harness.root / "ipython")},
            path=[harness.startup, harness.fakes, site],
        )
    )
    cells = result.stdout.split("--- cell done\n")
    # the notice went to stderr at the first GPU use (a notebook shows it under the cell)
    assert len(notice_lines(result)) == 1
    assert "OutOfMemoryError" in cells[2]
    assert len(hint_lines(cells[2])) == 1
    assert "ValueError: something else" in cells[3]
    assert hint_lines(cells[3]) == []
    # once per process: the second out-of-memory error is shown as torch words it
    assert "OutOfMemoryError" in cells[4]
    assert hint_lines(cells[4]) == []
    assert cells[5] == "still running\n"


@given(
    framework=st.sampled_from(["torch", "jax", "cupy", "tensorflow", "something"]),
    cap=st.one_of(st.none(), st.floats(0, 1e13)),
    total=st.one_of(st.none(), st.floats(0, 1e13)),
    replicas=st.one_of(st.none(), st.integers(-2, 64)),
    slices=st.one_of(st.none(), st.integers(-2, 8)),
    sharing=st.sampled_from(["", "mps", "time-slicing", "mixed"]),
    at_cap=st.sampled_from([None, True, False]),
)
def test_texts_are_one_line_for_any_facts(framework, cap, total, replicas, slices, sharing, at_cap):
    notice = guard.notice_text(framework, cap, total, replicas, slices, sharing)
    if replicas is None or replicas < 2:
        assert notice is None
    else:
        assert notice.startswith(NOTICE.replace("4", str(replicas)))
        assert "\n" not in notice
    hint = guard.oom_hint_text(framework, cap, at_cap, replicas, slices, sharing)
    assert hint.startswith("gpushare: ")
    assert "\n" not in hint


@pytest.mark.parametrize(
    ("module", "name", "message", "expected"),
    [
        ("torch", "OutOfMemoryError", "CUDA out of memory", "torch"),
        ("torch.cuda", "OutOfMemoryError", "CUDA out of memory", "torch"),
        ("cupy.cuda.memory", "OutOfMemoryError", "Out of memory allocating", "cupy"),
        ("jaxlib._jax", "JaxRuntimeError", "RESOURCE_EXHAUSTED: Out of memory", "jax"),
        ("jaxlib._jax", "JaxRuntimeError", "INVALID_ARGUMENT: shapes", None),
        ("tensorflow.python.framework.errors_impl", "ResourceExhaustedError", "OOM", "tensorflow"),
        ("mylib", "OutOfMemoryError", "not a framework's", None),
    ],
)
def test_out_of_memory_errors_are_recognised_by_framework(module, name, message, expected):
    error_type = type(name, (RuntimeError,), {"__module__": module})
    found = guard._oom_of(error_type(message))
    assert (found[0] if found else None) == expected


def test_what_the_error_says_about_the_cap():
    assert guard._at_cap("torch", TORCH_CAP_OOM) is True
    full = TORCH_CAP_OOM.replace("104.30 GiB is free", "512.00 MiB is free")
    assert guard._at_cap("torch", full) is False
    assert guard._at_cap("torch", "CUDA error: out of memory") is None
    assert guard._at_cap("cupy", "... (limit set to: 37,527,470,080 bytes)") is True
    assert guard._at_cap("cupy", "Out of memory allocating 1,024 bytes") is False
    assert guard._at_cap("jax", "RESOURCE_EXHAUSTED") is None


# --- TensorFlow ----------------------------------------------------------------------


def test_tensorflow_gets_a_logical_device_limit_per_gpu(harness):
    env = {
        "GPUSHARE_MEMORY_FRACTION": "0.25",
        "GPUSHARE_GPU_MEMORY_MIB": "81559",
        "FAKE_TF_GPUS": "2",
    }
    result = ok(harness.run("import tensorflow\n" + REPORT, env=env))
    logical = [e for e in harness.events() if e["event"] == "logical"]
    assert [(e["device"], e["limits"]) for e in logical] == [
        ("/physical_device:GPU:0", [20389]),
        ("/physical_device:GPU:1", [20389]),
    ]
    assert json.loads(result.stdout)["applied"] == {"tensorflow": "memory_limit=20389 MiB x2"}
    assert result.stderr == ""


def test_tensorflow_without_gpus_is_left_alone(harness):
    env = {**FRACTION, "FAKE_TF_GPUS": "0"}
    result = ok(harness.run("import tensorflow", env=env))
    assert harness.names() == ["import tensorflow"]
    assert result.stderr == ""


# --- chaining to the image's own sitecustomize ------------------------------------------


def make_image_sitecustomize(harness: Harness, text: str) -> Path:
    image = harness.root / "image"
    image.mkdir()
    (image / "sitecustomize.py").write_text(text)
    return image


def test_image_sitecustomize_runs_exactly_once_after_the_guard(harness):
    # an image whose own sitecustomize imports torch: the guard is armed first
    ran = harness.root / "image-ran"
    image = make_image_sitecustomize(
        harness, f"import torch\nopen({str(ran)!r}, 'a').write(__file__ + '\\n')\n"
    )
    code = "import sitecustomize; print(sitecustomize.gpushare_chained)"
    result = ok(harness.run(code, env=FRACTION, path=[harness.startup, harness.fakes, image]))
    assert result.stdout == f"{image / 'sitecustomize.py'}\n"
    assert ran.read_text() == f"{image / 'sitecustomize.py'}\n"
    assert harness.names() == ["import torch", "lazy_call"]
    assert result.stderr == ""


def test_image_sitecustomize_that_chains_too_does_not_loop(harness):
    # an image whose sitecustomize also runs "the next one on sys.path" finds ours again
    ran = harness.root / "image-ran"
    image = make_image_sitecustomize(
        harness,
        "import os, sys, runpy\n"
        f"open({str(ran)!r}, 'a').write('x')\n"
        "me = os.path.realpath(__file__)\n"
        "for entry in sys.path:\n"
        "    candidate = os.path.join(entry, 'sitecustomize.py')\n"
        "    if os.path.isfile(candidate) and os.path.realpath(candidate) != me:\n"
        "        runpy.run_path(candidate)\n",
    )
    result = ok(harness.run("print('ok')", env=FRACTION, path=[harness.startup, image]))
    assert result.stdout == "ok\n"
    assert ran.read_text() == "x"


def test_a_second_copy_of_the_startup_folder_is_skipped(harness):
    copy = harness.root / "copy"
    copy.mkdir()
    for name, text in guard.startup_files().items():
        (copy / name).write_text(text)
    ran = harness.root / "image-ran"
    image = make_image_sitecustomize(harness, f"open({str(ran)!r}, 'a').write('x')\n")
    result = ok(
        harness.run(
            "import torch\n" + REPORT,
            env=FRACTION,
            path=[harness.startup, copy, harness.fakes, image],
        )
    )
    assert ran.read_text() == "x"
    assert json.loads(result.stdout)["guard_finders"] == 1
    assert harness.names().count("lazy_call") == 1


def test_a_failing_image_sitecustomize_is_reported_like_python_does(harness):
    image = make_image_sitecustomize(harness, "raise ValueError('image is broken')\n")
    result = ok(
        harness.run("import torch", env=FRACTION, path=[harness.startup, harness.fakes, image])
    )
    assert "Error in sitecustomize" in result.stderr
    assert "ValueError: image is broken" in result.stderr
    assert harness.names() == ["import torch", "lazy_call"]


def test_no_image_sitecustomize_is_fine(harness):
    code = "import sitecustomize; print(sitecustomize.gpushare_chained)"
    result = ok(harness.run(code, env=FRACTION))
    assert result.stdout == "None\n"
    assert result.stderr == ""


# --- the image's own PYTHONPATH -------------------------------------------------------


def test_a_profiles_image_pythonpath_keeps_the_images_modules_and_sitecustomize(harness):
    image = harness.root / "image-lib"
    image.mkdir()
    (image / "imagetool.py").write_text("WHERE = 'image'\n")
    ran = harness.root / "image-sitecustomize-ran"
    (image / "sitecustomize.py").write_text(f"open({str(ran)!r}, 'a').write('x')\n")
    # what the spawner puts in the pod for image_pythonpath = "<image>:" (a stray colon)
    share = GPUShare(
        "nvidia.com/gpu",
        1,
        4,
        0.2447,
        startup_path=str(harness.startup),
        image_pythonpath=f"{image}:",
    )
    pythonpath = share.environment()["PYTHONPATH"]
    assert pythonpath == f"{harness.startup}:{image}"
    code = "import sys, imagetool\nprint(imagetool.WHERE, '' in sys.path[1:])\n" + REPORT
    result = ok(
        harness.run(
            code,
            env={**FRACTION, "PYTHONPATH": f"{pythonpath}:{harness.fakes}"},
            path=[],
        )
    )
    first, report = result.stdout.splitlines()
    assert first == "image False"
    assert ran.read_text() == "x"
    assert json.loads(report)["guard_finders"] == 1


# --- the .pth autostart for images with jupyterhub-gpushare installed ----------------------

PTH = REPO / "jupyterhub_gpushare" / "guard_autostart.pth"


@pytest.fixture
def site_dir(harness: Harness) -> Path:
    """A site-packages folder holding the .pth file as the wheel installs it."""
    site_dir = harness.root / "site"
    site_dir.mkdir()
    (site_dir / "jupyterhub_gpushare_guard.pth").write_text(PTH.read_text())
    return site_dir


def test_pth_file_has_exactly_one_import_line():
    lines = [line for line in PTH.read_text().splitlines() if not line.startswith("#")]
    assert len(lines) == 1
    # site.py executes a .pth line only if it starts with "import"
    assert lines[0].startswith("import ")


def test_pth_file_activates_the_guard_without_importing_the_package(harness, site_dir):
    code = (
        "import site, sys\n"
        f"site.addsitedir({str(site_dir)!r})\n"
        "print('gpushare_guard' in sys.modules, 'jupyterhub_gpushare' in sys.modules)\n"
        "import torch\n" + REPORT
    )
    result = ok(harness.run(code, env=FRACTION, path=[harness.fakes, REPO]))
    loaded, report = result.stdout.splitlines()
    # the guard alone: the package's __init__ pulls in the hub's dependencies
    assert loaded == "True False"
    assert json.loads(report)["guard_finders"] == 1
    assert harness.names() == ["import torch", "lazy_call"]
    assert result.stderr == ""


def test_pth_file_without_a_fraction_imports_nothing(harness, site_dir):
    code = (
        "import site, sys\n"
        "before = set(sys.modules)\n"
        f"site.addsitedir({str(site_dir)!r})\n"
        "print(sorted(set(sys.modules) - before))\n"
    )
    result = ok(harness.run(code, path=[harness.fakes, REPO]))
    assert result.stdout == "[]\n"
    assert result.stderr == ""


def test_pth_file_and_startup_folder_together_cap_once(harness, site_dir):
    code = f"import site\nsite.addsitedir({str(site_dir)!r})\nimport torch\n" + REPORT
    result = ok(harness.run(code, env=FRACTION, path=[harness.startup, harness.fakes, REPO]))
    assert json.loads(result.stdout)["guard_finders"] == 1
    assert harness.names() == ["import torch", "lazy_call"]
    assert result.stderr == ""


def test_installed_package_starts_the_guard_by_itself():
    """pip-installed in the user image, the package's .pth activates the guard,
    and only when a fraction is set."""
    code = "import sys; print('gpushare_guard' in sys.modules, 'torch' in sys.modules)"
    on = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "GPUSHARE_MEMORY_FRACTION": "0.25"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert on.stdout.split() == ["True", "False"]
    env = {k: v for k, v in os.environ.items() if k != "GPUSHARE_MEMORY_FRACTION"}
    off = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert off.stdout.split() == ["False", "False"]
