"""gpushare's reading of device plugin configs against the plugin's own Go code.

``jupyterhub_gpushare.sharing.pluginconfig.read_config`` says, without a cluster,
what the NVIDIA device plugin will make of a config. Here every config of a
corpus of tricky ones (and a generated corpus of mutations) goes through both
it and ``gpushare-plugin-config``, which parses with the plugin's
``api/config/v1`` package. Any difference fails the test, except where
gpushare refuses on purpose a config the plugin would run
(``DELIBERATE_REFUSALS``, each with its reason in code).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest

from jupyterhub_gpushare.sharing import pluginconfig as pc
from jupyterhub_gpushare.sharing.pluginconfig import Sharing
from jupyterhub_gpushare.testing import pluginparser
from jupyterhub_gpushare.testing.pluginparser import PluginAnswer

UUID = "b1028956-cfa2-0990-bf4a-5da9abb51763"


def ts(resources: str, extra: str = "") -> str:
    """A time-slicing config with ``resources`` as a flow list."""
    return f"version: v1\nsharing:\n  timeSlicing:\n{extra}    resources: {resources}\n"


def gpu(replicas: str = "4", extra: str = "") -> str:
    return ts(f"[{{name: nvidia.com/gpu, replicas: {replicas}{extra}}}]")


SEED = textwrap.dedent(
    """\
    version: v1
    sharing:
      timeSlicing:
        resources:
          - name: nvidia.com/gpu
            replicas: 4
    """
)

# (name, config): tricky in one way each
CORPUS: list[tuple[str, str]] = [
    # -- documents and versions
    ("empty", ""),
    ("comment only", "# nothing here\n"),
    ("empty mapping", "{}\n"),
    ("explicit null document", "~\n"),
    ("version only", "version: v1\n"),
    ("empty version", 'version: ""\n'),
    ("null version", "version: null\n"),
    ("version v2", "version: v2\n"),
    ("version V1", "version: V1\n"),
    ("version as a number", "version: 1\n"),
    ("version as a float", "version: 1.0\n"),
    ("version as a bool", "version: yes\n"),
    ("version as a list", "version: [v1]\n"),
    ("a list", "- version: v1\n"),
    ("a scalar", "hello\n"),
    (
        "JSON syntax",
        '{"version": "v1", "sharing": {"timeSlicing": {"resources": '
        '[{"name": "nvidia.com/gpu", "replicas": 3}]}}}\n',
    ),
    ("second document ignored", SEED + "---\nversion: v9\n"),
    ("second document broken", SEED + "---\n{[\n"),
    ("first document broken", "version: [\n---\n" + SEED),
    ("syntax error", "sharing:\n  timeSlicing: {resources: [\n"),
    ("tab indentation", "sharing:\n\ttimeSlicing: {}\n"),
    # -- sharing the plugin accepts
    ("the seed's config", SEED),
    ("short resource name", ts("[{name: gpu, replicas: 3}]")),
    ("renamed", gpu("4", "").replace("    resources", "    renameByDefault: true\n    resources")),
    ("mps", SEED.replace("timeSlicing", "mps")),
    (
        "mps renamed",
        "sharing:\n  mps:\n    renameByDefault: true\n    resources:\n"
        "    - {name: gpu, replicas: 5}\n",
    ),
    ("mps 48", "sharing: {mps: {resources: [{name: gpu, replicas: 48}]}}\n"),
    (
        "mps allows two slices",
        "sharing: {mps: {failRequestsGreaterThanOne: false, "
        "resources: [{name: gpu, replicas: 2}]}}\n",
    ),
    (
        "fail requests above one",
        gpu("4").replace("    resources", "    failRequestsGreaterThanOne: true\n    resources"),
    ),
    ("devices all", gpu("4", ", devices: all")),
    ("devices all quoted", gpu("4", ', devices: "all"')),
    ("MIG only", ts("[{name: mig-1g.10gb, replicas: 2}]")),
    ("MIG and GPU", ts("[{name: mig-1g.10gb, replicas: 2}, {name: gpu, replicas: 3}]")),
    ("unknown resource", ts("[{name: nvidia.com/tpu, replicas: 2}]")),
    ("timestamp-like resource", ts("[{name: 2001-12-14, replicas: 2}]")),
    ("flags only", "version: v1\nflags:\n  migStrategy: none\n  failOnInitError: true\n"),
    # -- names matched case-insensitively (structs) or exactly (sharing sections)
    ("Sharing capitalised", SEED.replace("sharing", "Sharing")),
    ("SHARING upper case", SEED.replace("sharing", "SHARING")),
    ("timeslicing lower case", SEED.replace("timeSlicing", "timeslicing")),
    ("TIMESLICING upper case", SEED.replace("timeSlicing", "TIMESLICING")),
    ("MPS upper case", SEED.replace("timeSlicing", "MPS")),
    ("long s in sharing", SEED.replace("sharing", "\u017fharing")),
    ("dotless i in sharing", SEED.replace("sharing", "shar\u0131ng")),
    ("Kelvin sign in a flag", "flags: {plugin: {nvidiaCT\u212aPath: 5}}\n"),
    ("Kelvin sign near a flag", "flags: {plugin: {nvidiaCTXPath: 5}}\n"),
    ("VERSION upper case", "VERSION: v2\n"),
    ("Resources capitalised", SEED.replace("resources", "Resources")),
    (
        "RenameByDefault capitalised",
        gpu().replace("    resources", "    RenameByDefault: true\n    resources"),
    ),
    ("Replicas capitalised", ts("[{name: gpu, Replicas: 4}]")),
    ("Name capitalised", ts("[{Name: gpu, replicas: 4}]")),
    ("Devices capitalised", ts("[{name: gpu, replicas: 4, Devices: [0]}]")),
    ("flag names in any case", "flags:\n  MIGSTRATEGY: none\n  Plugin: {PassDeviceSpecs: true}\n"),
    # -- keys given twice
    ("replicas twice", ts("[{name: gpu, replicas: 2, replicas: 6}]")),
    (
        "sharing twice",
        "sharing: {timeSlicing: {resources: [{name: gpu, replicas: 2}]}}\n"
        "sharing: {timeSlicing: {resources: [{name: gpu, replicas: 5}]}}\n",
    ),
    ("version twice", "version: v2\nversion: v1\n"),
    (
        "timeSlicing in two spellings",
        "sharing:\n"
        "  timeSlicing: {resources: [{name: gpu, replicas: 2}]}\n"
        "  timeslicing: {resources: [{name: gpu, replicas: 6}]}\n",
    ),
    ("version in two spellings, lower last", "Version: v2\nversion: v1\n"),
    ("version in two spellings, upper last", "version: v2\nVersion: v1\n"),
    # -- null and empty
    ("sharing null", "sharing: null\n"),
    ("sharing empty", "sharing: {}\n"),
    ("timeSlicing null", "sharing: {timeSlicing: null}\n"),
    ("timeSlicing empty value", "sharing:\n  timeSlicing:\n"),
    ("timeSlicing empty mapping", "sharing: {timeSlicing: {}}\n"),
    ("mps null", "sharing: {mps: null}\n"),
    ("mps null beside timeSlicing", SEED + "  mps: null\n"),
    ("mps empty mapping", "sharing: {mps: {}}\n"),
    ("resources null", "sharing: {timeSlicing: {resources: null}}\n"),
    ("resources empty", "sharing: {timeSlicing: {resources: []}}\n"),
    ("resources a mapping", "sharing: {timeSlicing: {resources: {name: gpu, replicas: 2}}}\n"),
    ("null resource", ts("[null]")),
    (
        "renameByDefault null",
        gpu().replace("    resources", "    renameByDefault: null\n    resources"),
    ),
    (
        "failRequests null",
        gpu().replace("    resources", "    failRequestsGreaterThanOne: ~\n    resources"),
    ),
    ("replicas null", gpu("null")),
    ("name null", ts("[{name: null, replicas: 2}]")),
    ("name missing", ts("[{replicas: 2}]")),
    ("replicas missing", ts("[{name: gpu}]")),
    ("devices null", gpu("2", ", devices: null")),
    ("rename null", gpu("2", ", rename: null")),
    ("flags null", "flags: null\n"),
    ("flags.plugin null", "flags: {plugin: null}\n"),
    ("imex null", "imex: ~\n"),
    # -- replicas in every form YAML allows
    ("replicas as a string", gpu('"4"')),
    ("replicas 4.0", gpu("4.0")),
    ("replicas 4.", gpu("4.")),
    ("replicas 4.5", gpu("4.5")),
    ("replicas 1e1", gpu("1e1")),
    ("replicas 1E+1", gpu("1E+1")),
    ("replicas 010", gpu("010")),
    ("replicas 08", gpu("08")),
    ("replicas 0o10", gpu("0o10")),
    ("replicas 0x10", gpu("0x10")),
    ("replicas 0b100", gpu("0b100")),
    ("replicas 1_0", gpu("1_0")),
    ("replicas +4", gpu("+4")),
    ("replicas -4", gpu("-4")),
    ("replicas 1", gpu("1")),
    ("replicas 0", gpu("0")),
    ("replicas 1:30", gpu("1:30")),
    ("replicas true", gpu("true")),
    ("replicas yes", gpu("yes")),
    ("replicas .inf", gpu(".inf")),
    ("replicas .nan", gpu(".nan")),
    ("replicas int64 max", gpu("9223372036854775807")),
    ("replicas int64 max + 1", gpu("9223372036854775808")),
    ("replicas 20 digits", gpu("99999999999999999999")),
    ("replicas 1e21", gpu("1e21")),
    ("replicas 1e400", gpu("1e400")),
    ("replicas 60000", gpu("60000")),
    ("replicas 60001", gpu("60001")),
    ("replicas a million", gpu("1000000")),
    ("mps 49", "sharing: {mps: {resources: [{name: gpu, replicas: 49}]}}\n"),
    ("replicas !!int", gpu('!!int "4"')),
    ("replicas !!str", gpu("!!str 4")),
    ("replicas !!float", gpu("!!float 4")),
    ("replicas !!bool", gpu("!!bool 4")),
    ("replicas !!binary", gpu("!!binary NA==")),
    # -- booleans in YAML 1.1 spellings
    (
        "renameByDefault yes",
        gpu().replace("    resources", "    renameByDefault: yes\n    resources"),
    ),
    (
        "renameByDefault on",
        gpu().replace("    resources", "    renameByDefault: on\n    resources"),
    ),
    ("renameByDefault Y", gpu().replace("    resources", "    renameByDefault: Y\n    resources")),
    (
        "renameByDefault string",
        gpu().replace("    resources", '    renameByDefault: "true"\n    resources'),
    ),
    ("renameByDefault 1", gpu().replace("    resources", "    renameByDefault: 1\n    resources")),
    (
        "renameByDefault tRUE",
        gpu().replace("    resources", "    renameByDefault: tRUE\n    resources"),
    ),
    (
        "failRequests off",
        gpu().replace("    resources", "    failRequestsGreaterThanOne: off\n    resources"),
    ),
    # -- devices
    ("devices 0", gpu("2", ", devices: 0")),
    ("devices 2", gpu("2", ", devices: 2")),
    ("devices 2.0", gpu("2", ", devices: 2.0")),
    ("devices -1", gpu("2", ", devices: -1")),
    ("devices some", gpu("2", ", devices: some")),
    ("devices true", gpu("2", ", devices: true")),
    ("devices mapping", gpu("2", ", devices: {a: 1}")),
    ("devices empty list", gpu("2", ", devices: []")),
    ("devices indices", gpu("2", ", devices: [0, 1]")),
    ("devices null index", gpu("2", ", devices: [null]")),
    ("devices negative index", gpu("2", ", devices: [-1]")),
    ("devices fraction", gpu("2", ", devices: [1.5]")),
    ("devices index strings", gpu("2", ', devices: ["0", "0:1"]')),
    ("devices GPU UUID", gpu("2", f", devices: [GPU-{UUID}]")),
    ("devices GPU UUID braces", gpu("2", f', devices: ["GPU-{{{UUID}}}"]')),
    ("devices MIG UUID", gpu("2", f", devices: [MIG-{UUID}]")),
    ("devices MIG of GPU", gpu("2", f", devices: [MIG-GPU-{UUID}/1/0]")),
    ("devices bad UUID", gpu("2", ", devices: [GPU-1234]")),
    ("devices word", gpu("2", ", devices: [first]")),
    # -- resource names and renames
    ("name nvidia.com/GPU", ts("[{name: nvidia.com/GPU, replicas: 2}]")),
    ("name of another vendor", ts("[{name: example.com/gpu, replicas: 2}]")),
    ("name empty", ts('[{name: "", replicas: 2}]')),
    ("name a number", ts("[{name: 5, replicas: 2}]")),
    ("name with a slash", ts("[{name: nvidia.com/gpu/x, replicas: 2}]")),
    ("name 63 characters", ts(f"[{{name: nvidia.com/{'a' * 52}, replicas: 2}}]")),
    ("name 64 characters", ts(f"[{{name: nvidia.com/{'a' * 53}, replicas: 2}}]")),
    ("rename without renameByDefault", gpu("2", ", rename: my-gpu")),
    ("rename empty", gpu("2", ', rename: ""')),
    ("rename invalid", gpu("2", ", rename: My_GPU")),
    (
        "rename the default",
        gpu("2", ", rename: nvidia.com/gpu.shared").replace(
            "    resources", "    renameByDefault: true\n    resources"
        ),
    ),
    # -- two strategies, several entries
    ("timeSlicing and mps", SEED + "  mps: {resources: [{name: gpu, replicas: 2}]}\n"),
    (
        "mps for MIG beside timeSlicing",
        SEED + "  mps: {resources: [{name: mig-1g.10gb, replicas: 2}]}\n",
    ),
    (
        "broken timeSlicing beside mps",
        "sharing: {timeSlicing: {}, mps: {resources: [{name: gpu, replicas: 2}]}}\n",
    ),
    ("two equal entries", ts("[{name: gpu, replicas: 4}, {name: nvidia.com/gpu, replicas: 4}]")),
    ("two entries, fewer first", ts("[{name: gpu, replicas: 2}, {name: gpu, replicas: 8}]")),
    ("two entries, more first", ts("[{name: gpu, replicas: 8}, {name: gpu, replicas: 2}]")),
    # -- flags, imex, custom resources
    ("migStrategy a number", "flags: {migStrategy: 1}\n"),
    ("failOnInitError maybe", "flags: {failOnInitError: maybe}\n"),
    ("failOnInitError yes", "flags: {failOnInitError: yes}\n"),
    ("renameByDefault under flags", "version: v1\nflags:\n  renameByDefault: true\n"),
    ("typo under flags", "flags: {migStrategie: none}\n"),
    ("deviceListStrategy list", "flags: {plugin: {deviceListStrategy: [envvar, cdi-cri]}}\n"),
    ("deviceListStrategy number", "flags: {plugin: {deviceListStrategy: 5}}\n"),
    ("deviceListStrategy null item", "flags: {plugin: {deviceListStrategy: [null]}}\n"),
    ("deviceIDStrategy a number", "flags: {plugin: {deviceIDStrategy: 1}}\n"),
    ("sleepInterval 10s", "flags: {gfd: {sleepInterval: 10s}}\n"),
    ("sleepInterval 1h30m", "flags: {gfd: {sleepInterval: 1h30m}}\n"),
    ("sleepInterval a number", "flags: {gfd: {sleepInterval: 10}}\n"),
    ("sleepInterval infinite", "flags: {gfd: {sleepInterval: infinite}}\n"),
    ("sleepInterval 1x", "flags: {gfd: {sleepInterval: 1x}}\n"),
    ("sleepInterval true", "flags: {gfd: {sleepInterval: true}}\n"),
    ("sleepInterval .5s", "flags: {gfd: {sleepInterval: .5s}}\n"),
    ("flags a list", "flags: [a]\n"),
    ("imex channel 0", "imex: {channelIDs: [0], required: yes}\n"),
    ("imex channel word", "imex: {channelIDs: [a]}\n"),
    ("imex channel 1.0", "imex: {channelIDs: [1.0]}\n"),
    ("custom resources", "version: v1\nresources:\n  gpus:\n  - {pattern: '*', name: gpu}\n"),
    ("custom resource without pattern", "resources: {gpus: [{name: gpu}]}\n"),
    ("custom resource bad name", "resources: {gpus: [{pattern: '*', name: Bad_Name}]}\n"),
    ("custom resource null", "resources: {mig: [null]}\n"),
    # -- YAML features
    (
        "anchor and alias",
        "sharing:\n  timeSlicing:\n    resources:\n"
        "    - &r {name: gpu, replicas: 3}\n  mps: {resources: [*r]}\n",
    ),
    (
        "merge key",
        "base: &b {name: gpu, replicas: 2}\nsharing:\n  timeSlicing:\n"
        "    resources:\n    - <<: *b\n      replicas: 6\n",
    ),
    (
        "merge key after an explicit key",
        "base: &b {name: gpu, replicas: 2}\nsharing:\n"
        "  timeSlicing:\n    resources:\n    - replicas: 6\n      <<: *b\n",
    ),
    (
        "merge of a list",
        "a: &a {replicas: 3}\nb: &b {replicas: 5, name: gpu}\nsharing:\n"
        "  timeSlicing:\n    resources:\n    - <<: [*a, *b]\n",
    ),
    ("merge of a scalar", "a: &a 5\nsharing: {timeSlicing: {resources: [{<<: *a}]}}\n"),
    ("null key", "~: 1\n" + SEED),
    ("number key", "1: x\n" + SEED),
    ("bool key", "yes: x\n" + SEED),
    ("float key", "1.5: x\n" + SEED),
    ("list as a key", "? [a]\n: x\n" + SEED),
    ("NaN in an unknown field", SEED + "extra: .nan\n"),
    ("infinity in a list", SEED + "extra: [1, -.inf]\n"),
    ("key with a trailing space", '"sharing ": {}\n'),
    (
        "quoted keys",
        '"version": "v1"\n"sharing": {"timeSlicing": {"resources": '
        '[{"name": "gpu", "replicas": 2}]}}\n',
    ),
    (
        "block scalar name",
        "sharing:\n  timeSlicing:\n    resources:\n    - name: |-\n"
        "        gpu\n      replicas: 2\n",
    ),
    ("undefined alias", "sharing: *nothing\n"),
    ("unknown tag", SEED + "extra: !custom 5\n"),
]


def sharing_of(answer: PluginAnswer) -> Sharing:
    gpu = answer.gpu
    if gpu.label_replicas <= 1:
        return pc.NOT_SHARED
    return Sharing(gpu.strategy, gpu.label_replicas, gpu.renamed)


def known_version_difference(answer: PluginAnswer) -> bool:
    """The one difference between plugin versions we know of: before v0.20.0 the plugin
    refuses requests for 2+ slices under MPS whatever the config says; gpushare reads
    configs as v0.20.0 (what GPU operator v26.7.0 deploys) does."""
    return answer.plugin_version.startswith("v0.19.") and answer.gpu.strategy == "mps"


def disagreement(ours: pc.PluginReading, answer: PluginAnswer) -> str | None:
    """How gpushare's reading differs from the plugin's, or None."""
    if answer.ok != ours.runs:
        if answer.ok:
            return f"the plugin runs it; gpushare says it fails: {ours.error}"
        return f"the plugin fails ({answer.error}); gpushare says it runs"
    if ours.refusal is not None:
        name = ours.refusal[0]
        if name not in pc.DELIBERATE_REFUSALS:
            return f"gpushare refuses it for an undocumented reason: {ours.refusal}"
    if not answer.ok:
        return None
    expected = sharing_of(answer)
    if ours.sharing != expected:
        return f"the plugin gives {expected}, gpushare says {ours.sharing}"
    if ours.devices_per_gpu != answer.gpu.devices_per_gpu:
        return (
            f"the plugin lists {answer.gpu.devices_per_gpu} devices per GPU, gpushare says "
            f"{ours.devices_per_gpu}"
        )
    fail_requests = answer.gpu.fail_requests_greater_than_one
    if expected.shared and not known_version_difference(answer):
        if ours.fail_requests_greater_than_one != fail_requests:
            return f"the plugin says failRequestsGreaterThanOne is {fail_requests}"
    return None


@pytest.fixture(scope="module")
def parser():
    try:
        return pluginparser.binary()
    except pluginparser.ParserUnavailable as e:
        pytest.fail(f"the device plugin's parser cannot be built: {e}")


def compare(parser, corpus: list[tuple[str, str]]) -> dict[str, str]:
    answers = pluginparser.read_many([text for _, text in corpus], parser)
    found = {}
    for (name, text), answer in zip(corpus, answers, strict=True):
        problem = disagreement(pc.read_config(text), answer)
        if problem:
            found[name] = problem
    return found


def test_names_in_the_corpus_are_unique():
    names = [name for name, _ in CORPUS]
    assert len(names) == len(set(names))


def test_the_corpus_reads_as_the_plugin_reads_it(parser):
    assert compare(parser, CORPUS) == {}


def test_the_corpus_exercises_every_deliberate_refusal_and_both_verdicts(parser):
    answers = pluginparser.read_many([text for _, text in CORPUS], parser)
    ours = [pc.read_config(text) for _, text in CORPUS]
    refused = {r.refusal[0] for r, a in zip(ours, answers, strict=True) if a.ok and r.refusal}
    assert refused == set(pc.DELIBERATE_REFUSALS)
    assert sum(a.ok for a in answers) > 50 and sum(not a.ok for a in answers) > 50


# -- generated configs: mutations of valid ones, in one run of the parser -------------------
BASES = [
    SEED,
    SEED.replace("timeSlicing", "mps"),
    gpu("3").replace("    resources", "    renameByDefault: true\n    resources"),
    "version: v1\nflags:\n  migStrategy: none\n  plugin: {passDeviceSpecs: true}\n"
    "  gfd: {sleepInterval: 60s}\n" + SEED.removeprefix("version: v1\n"),
    ts("[{name: gpu, replicas: 2, devices: all}, {name: mig-1g.10gb, replicas: 3}]"),
]
SCALARS = [
    "2",
    "3",
    "07",
    "08",
    "0x4",
    "4.0",
    "4.5",
    "1e1",
    "yes",
    "no",
    "on",
    "~",
    "null",
    "''",
    '"4"',
    "-2",
    "1",
    "0",
    "all",
    "[0]",
    "[]",
    "{}",
    "gpu",
    "nvidia.com/gpu",
    "true",
    "9223372036854775808",
    ".inf",
    "1_2",
    "60001",
    "49",
]


def mutate(text: str, rng: random.Random) -> str:
    """One or two small changes of the kinds admins make: case, a value, a key dropped,
    a line repeated or indented otherwise."""
    lines = text.splitlines()
    for _ in range(rng.choice((1, 1, 2))):
        index = rng.randrange(len(lines))
        line = lines[index]
        key, colon, rest = line.partition(":")
        choice = rng.randrange(6)
        if choice == 0 and colon:
            stripped = key.lstrip(" -")
            lead = key[: len(key) - len(stripped)]
            changed = rng.choice([stripped.upper(), stripped.lower(), stripped.capitalize()])
            lines[index] = lead + changed + colon + rest
        elif choice == 1 and colon and rest.strip():
            lines[index] = f"{key}: {rng.choice(SCALARS)}"
        elif choice == 2 and len(lines) > 1:
            del lines[index]
        elif choice == 3:
            lines.insert(index, line)
        elif choice == 4 and colon:
            lines[index] = line.replace(key.strip(" -"), key.strip(" -") + rng.choice("sx"), 1)
        else:
            lines[index] = "  " + line
    return "\n".join(lines) + "\n"


def test_generated_configs_read_as_the_plugin_reads_them(parser):
    rng = random.Random(13)
    corpus = [(f"mutation {i}", mutate(rng.choice(BASES), rng)) for i in range(600)]
    found = compare(parser, corpus)
    texts = dict(corpus)
    assert {name: (texts[name], why) for name, why in found.items()} == {}


# -- gpushare's own limits, checked against the plugin's code ------------------------------
def test_every_config_gpushare_writes_reads_the_same_to_the_plugin(parser):
    sharings = [
        Sharing(strategy, replicas, renamed)
        for strategy in pc.STRATEGIES
        for replicas in (2, 3, 4, 7, pc.max_replicas(strategy))
        for renamed in (False, True)
    ]
    answers = pluginparser.read_many([pc.render_config(s) for s in sharings], parser)
    for sharing, answer in zip(sharings, answers, strict=True):
        assert answer.ok and answer.warnings == [], (sharing, answer)
        assert sharing_of(answer) == sharing
        assert answer.gpu.devices_per_gpu == sharing.replicas
        assert answer.gpu.fail_requests_greater_than_one == pc.fails_requests_above_one(sharing)
        assert pc.read_config(pc.render_config(sharing)).usable


def test_the_slice_limit_fits_the_kubelets_message(parser):
    """MAX_SLICES_PER_NODE is what fits the 4 MiB ListAndWatch message, for any GPU count."""
    for gpus in (1, 2, 4, 8, 16):
        size = pluginparser.list_and_watch_bytes(gpus, pc.MAX_SLICES_PER_NODE // gpus, parser)
        assert size <= pc.KUBELET_MAX_MESSAGE_BYTES, (gpus, size)
    # and the limit is not far below what fits: within 10 %
    over = pluginparser.list_and_watch_bytes(1, pc.MAX_SLICES_PER_NODE * 11 // 10, parser)
    assert over > pc.KUBELET_MAX_MESSAGE_BYTES


# -- building the parser: one clear line when it cannot be built -----------------------------
def run_build(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(pluginparser.BUILD_SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_missing_go_toolchain_is_one_clear_line(tmp_path):
    path = os.pathsep.join(
        p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "go").exists()
    )
    result = run_build({"PATH": path, "HOME": str(tmp_path), "GPUSHARE_CACHE": str(tmp_path)})
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("gpushare build: the Go toolchain is missing: install Go")


def test_unreachable_module_proxy_is_one_clear_line(tmp_path):
    if shutil.which("go") is None:
        pytest.skip("needs the Go toolchain")
    # a closed port on loopback: the proxy cannot be reached, nothing leaves the machine
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "GPUSHARE_CACHE": str(tmp_path / "cache"),
        "GOMODCACHE": str(tmp_path / "mod"),
        "GOCACHE": str(tmp_path / "gocache"),
        "GOPROXY": f"http://127.0.0.1:{closed}",
        "GOSUMDB": "off",
    }
    result = run_build(env)
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert "cannot download Go module github.com/NVIDIA/k8s-device-plugin@v0.19.3" in line
    assert "module proxy" in line
    subprocess.run(["chmod", "-R", "u+w", str(tmp_path)], check=False)
