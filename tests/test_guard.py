"""The in-container memory guard, in real interpreters with stand-in torch and tensorflow.

Each test starts a fresh Python the way a user's server would be started: the
start-up folder from ``startup_files()`` first on PYTHONPATH, then a folder with
tiny stand-ins for torch and tensorflow that write what is done to them to a
JSON-lines log. No GPU, no cluster, no real framework.
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


def test_hook_removes_itself_once_both_frameworks_are_capped(harness):
    code = "import torch, tensorflow\n" + REPORT
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


def test_fraction_in_alloc_conf_means_the_allocator_does_it(harness):
    conf = "expandable_segments:True,per_process_memory_fraction:0.25"
    code = "import torch\ntorch.cuda._lazy_init()\n" + REPORT
    result = ok(harness.run(code, env={**FRACTION, "PYTORCH_CUDA_ALLOC_CONF": conf}))
    assert json.loads(result.stdout)["applied"] == {"torch": "allocator config"}
    assert "set_fraction" not in harness.names()
    assert "lazy_call" not in harness.names()
    cuda_init = next(e for e in harness.events() if e["event"] == "cuda_init")
    assert cuda_init["alloc_conf"] == conf
    assert result.stderr == ""


def test_old_torch_gets_the_key_removed_and_the_hook_instead(harness):
    conf = "expandable_segments:True,per_process_memory_fraction:0.25"
    code = "import torch\ntorch.cuda._lazy_init()"
    env = {**FRACTION, "PYTORCH_CUDA_ALLOC_CONF": conf, "FAKE_TORCH_VERSION": "2.9.1+cu128"}
    result = ok(harness.run(code, env=env))
    cuda_init = next(e for e in harness.events() if e["event"] == "cuda_init")
    assert cuda_init["alloc_conf"] == "expandable_segments:True"
    sets = [e["fraction"] for e in harness.events() if e["event"] == "set_fraction"]
    assert sets == [0.2344]
    assert len(guard_lines(result)) == 1
    assert "does not know per_process_memory_fraction" in guard_lines(result)[0]


def test_cuda_malloc_async_warns_once(harness):
    code = "import torch\ntorch.cuda._lazy_init()\nimport torch"
    env = {**FRACTION, "PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}
    result = ok(harness.run(code, env=env))
    lines = guard_lines(result)
    assert len(lines) == 1
    assert "cudaMallocAsync" in lines[0]


def test_native_backend_does_not_warn(harness):
    env = {**FRACTION, "PYTORCH_CUDA_ALLOC_CONF": "backend:native,expandable_segments:True"}
    result = ok(harness.run("import torch\ntorch.cuda._lazy_init()", env=env))
    assert result.stderr == ""
    assert "set_fraction" in harness.names()


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
