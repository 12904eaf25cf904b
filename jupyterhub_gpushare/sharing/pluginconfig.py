"""How the NVIDIA device plugin reads its config, and the configs gpushare writes.

The plugin (k8s-device-plugin, package ``api/config/v1``) reads its YAML with
sigs.k8s.io/yaml, in three steps that each leave a mark on the result:

1. go-yaml v2 turns the text into plain values with YAML 1.1 rules: ``yes`` and
   ``on`` are true, ``010`` is 8, ``08`` is 8 too (a float), ``1_000`` is 1000;
   of a key given twice the last one counts.
2. Those values become JSON, with the keys of every mapping sorted.
3. Go's encoding/json decodes the JSON into the plugin's structs: field names
   match case-insensitively (``timeslicing`` is ``timeSlicing``), unknown fields
   are ignored without a word, and three types decode themselves with exact key
   names: a sharing section (``renameByDefault``, ``resources``), a resource
   (``name``, ``replicas``, ``devices``, ``rename``) and devices.

Then the plugin checks the version and drops what it does not support yet
(``rename``, ``devices``, custom ``resources``), logging a warning for each.

:func:`read_config` repeats all of this in Python, without a cluster, so that
gpushare can say what the plugin will do with a config before anything is
written: the error it exits with, what it ignores, and the sharing full GPUs
get. ``tests/test_pluginconfig.py`` holds it against the plugin's own Go code on
a corpus of tricky configs. Where gpushare refuses a config the plugin would run,
the reason is one of :data:`DELIBERATE_REFUSALS`.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Any

import yaml

GPU_RESOURCE = "nvidia.com/gpu"
SHARED_RESOURCE = "nvidia.com/gpu.shared"
RESOURCE_PREFIX = "nvidia.com/"
STRATEGIES = ("time-slicing", "mps")
KEY_PREFIX = "gpushare-"


class ConfigError(ValueError):
    """Bad input or a cluster we must not touch; the message is one line for the user."""


# -- limits on replicas, from the plugin's source and the kubelet's ---------------------
MIN_REPLICAS = 2  # api/config/v1: "number of replicas must be >= 2"
# The MPS control daemon refuses more clients per GPU than MPS serves
# (cmd/mps-control-daemon/mps/device.go: 48, or 16 below compute capability 7.5).
MPS_MAX_CLIENTS = 48
MPS_MAX_CLIENTS_OLD_GPUS = 16
MPS_NEW_GPUS_FROM = (7, 5)
# Every slice is one device that the plugin lists to the kubelet in a single
# ListAndWatch message, and the kubelet's gRPC client takes at most 4 MiB. A slice
# costs about 66 bytes there (measured with the plugin's API types by
# gpushare-plugin-config --list-and-watch-bytes): some 63 000 fit, so we allow a
# round 60 000 per node. A larger count leaves the node with no GPUs at all.
KUBELET_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_SLICES_PER_NODE = 60_000


def max_replicas(strategy: str) -> int:
    """The most replicas per GPU that can work anywhere (a node with one new GPU)."""
    return MPS_MAX_CLIENTS if strategy == "mps" else MAX_SLICES_PER_NODE


def parse_replicas(text: object, strategy: str = "time-slicing") -> int:
    """``--replicas`` as a whole number the device plugin can serve."""
    value = str(text).strip()
    if not re.fullmatch(r"[+-]?[0-9]+", value):
        raise ConfigError(f"--replicas must be a whole number of at least 2, not {value!r}")
    replicas = int(value)
    if replicas < MIN_REPLICAS:
        raise ConfigError(
            f"--replicas must be at least 2, not {replicas}: the device plugin refuses fewer "
            "(run `gpushare disable` to stop sharing)"
        )
    if strategy == "mps" and replicas > MPS_MAX_CLIENTS:
        raise ConfigError(
            f"--replicas {replicas} is more than MPS serves: the device plugin's MPS control "
            f"daemon allows at most {MPS_MAX_CLIENTS} clients per GPU "
            f"({MPS_MAX_CLIENTS_OLD_GPUS} on GPUs older than compute capability 7.5)"
        )
    if replicas > MAX_SLICES_PER_NODE:
        raise ConfigError(
            f"--replicas {replicas} is more slices than a node can advertise: the device plugin "
            "lists every slice to the kubelet in one message of at most 4 MiB, room for about "
            f"{MAX_SLICES_PER_NODE} slices per node (gpushare allows at most that many)"
        )
    return replicas


# -- the sharing a config gives full GPUs ------------------------------------------------
@dataclass(frozen=True)
class Sharing:
    """How a node's full GPUs are shared: what GFD labels and capacity show."""

    strategy: str = "none"  # "none", "time-slicing" or "mps"
    replicas: int = 1
    renamed: bool = False

    @property
    def resource(self) -> str:
        return SHARED_RESOURCE if self.renamed and self.replicas > 1 else GPU_RESOURCE

    @property
    def shared(self) -> bool:
        return self.replicas > 1

    def describe(self) -> str:
        if not self.shared:
            return "not shared"
        return f"{self.strategy}, {self.replicas} replicas per GPU as {self.resource}"


NOT_SHARED = Sharing()


# -- the config gpushare writes -------------------------------------------------------
def build_config(sharing: Sharing) -> dict:
    """The device plugin config (api/config/v1) for ``sharing``."""
    if not sharing.shared or sharing.strategy not in STRATEGIES:
        raise ConfigError("a sharing config needs time-slicing or mps and at least 2 replicas")
    section: dict[str, Any] = {}
    if sharing.renamed:
        section["renameByDefault"] = True
    section["resources"] = [{"name": GPU_RESOURCE, "replicas": sharing.replicas}]
    key = "timeSlicing" if sharing.strategy == "time-slicing" else "mps"
    return {"version": "v1", "sharing": {key: section}}


def render_config(sharing: Sharing) -> str:
    """The config as the YAML text we store; stable, so equal text means no change."""
    return yaml.safe_dump(build_config(sharing), sort_keys=False, default_flow_style=False)


def config_key(sharing: Sharing) -> str:
    """The ConfigMap key for a config: the same sharing always gets the same key."""
    key = f"{KEY_PREFIX}{sharing.strategy}-{sharing.replicas}"
    return key + "-renamed" if sharing.renamed else key


def fails_requests_above_one(sharing: Sharing) -> bool:
    """Whether the plugin refuses pods asking for 2+ slices under ``sharing`` as we write it.

    Our configs leave ``failRequestsGreaterThanOne`` unset: false for
    time-slicing, true for MPS (the plugin's default there).
    """
    return sharing.strategy == "mps"


# -- what gpushare refuses although the plugin would run it ------------------------------
@dataclass(frozen=True)
class DeliberateRefusal:
    name: str
    why: str


DELIBERATE_REFUSALS = {
    r.name: r
    for r in (
        DeliberateRefusal(
            "unequal-duplicate-entries",
            "several entries for nvidia.com/gpu with different replicas: the plugin advertises "
            "the largest count, GPU feature discovery labels the first, so capacity and the "
            "replicas label (which sizes each user's memory share) disagree",
        ),
        DeliberateRefusal(
            "ambiguous-keys",
            "two keys that name the same field (they differ only in case): the plugin decodes "
            "both, the later in byte order partly over the earlier, and ends with a mix that "
            "neither says",
        ),
        DeliberateRefusal(
            "mps-clients",
            "MPS with more replicas than the MPS control daemon serves per GPU (48): the "
            "plugin parses it, the daemon refuses to start, and the node offers no GPU",
        ),
        DeliberateRefusal(
            "too-many-slices",
            "more slices than fit the one 4 MiB message in which the plugin lists them to the "
            "kubelet: the kubelet drops the plugin and the node offers no GPU",
        ),
    )
}


# -- the reading ------------------------------------------------------------------------
@dataclass
class PluginReading:
    """What the device plugin makes of one config."""

    sharing: Sharing = NOT_SHARED
    # the plugin (and GPU feature discovery) exit with this; None: they run
    error: str | None = None
    # gpushare refuses the config although the plugin runs it: (refusal name, message)
    refusal: tuple[str, str] | None = None
    # what the plugin ignores, or reads otherwise than it looks, one sentence each
    notes: list[str] = field(default_factory=list)
    # devices the plugin lists per GPU (the capacity); differs from replicas only
    # for a refused config with several entries for nvidia.com/gpu
    devices_per_gpu: int = 1
    fail_requests_greater_than_one: bool = False

    @property
    def runs(self) -> bool:
        """The plugin starts with this config."""
        return self.error is None

    @property
    def usable(self) -> bool:
        """The plugin starts with it and gpushare can build on it."""
        return self.error is None and self.refusal is None

    @property
    def problem(self) -> str | None:
        if self.error is not None:
            return f"the device plugin refuses it: {self.error}"
        if self.refusal is not None:
            return self.refusal[1]
        return None


class _PluginError(Exception):
    """The plugin's parser fails: the message says where and why."""


def read_config(text: str) -> PluginReading:
    """Read ``text`` the way the device plugin does; never raises."""
    reader = _Reader()
    try:
        value = reader.load(text)
        config = reader.decode_config(value)
        return reader.reading(config)
    except _PluginError as e:
        return PluginReading(error=str(e), notes=reader.notes)
    except RecursionError:
        return PluginReading(error="the config is nested too deeply")


def check_config(text: str, key: str, where: str) -> Sharing:
    """The sharing a config gives, or ConfigError naming its place and its problem."""
    reading = read_config(text)
    if reading.problem:
        raise ConfigError(f'config "{key}" in {where}: {reading.problem}')
    return reading.sharing


# -- step 1: YAML as go-yaml v2 reads it ----------------------------------------------------
_PLAIN = "gpushare:plain"  # a plain scalar, resolved below the way go-yaml v2 does
_TAG = "tag:yaml.org,2002:"


class _RawLoader(yaml.SafeLoader):
    """Composes YAML nodes and leaves plain scalars unresolved (PyYAML resolves YAML
    1.1 a little differently from go-yaml v2: 08, 0o10, 1:30 and 1e3 differ)."""

    def resolve(self, kind, value, implicit):
        if kind is yaml.ScalarNode and implicit[0]:
            return _PLAIN
        return super().resolve(kind, value, implicit)


# go-yaml v2's resolve table: these plain scalars are looked up by their text
_GO_YAML_WORDS: dict[str, Any] = {
    **dict.fromkeys(("y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE"), True),
    **dict.fromkeys(("on", "On", "ON"), True),
    **dict.fromkeys(("n", "N", "no", "No", "NO", "false", "False", "FALSE"), False),
    **dict.fromkeys(("off", "Off", "OFF"), False),
    **dict.fromkeys(("", "~", "null", "Null", "NULL"), None),
    **dict.fromkeys((".nan", ".NaN", ".NAN"), math.nan),
    **dict.fromkeys((".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"), math.inf),
    **dict.fromkeys(("-.inf", "-.Inf", "-.INF"), -math.inf),
}
_OBVIOUS_WORDS = {"true", "false", "null", "~", ""}
_MAX_VALUES = 100_000
_YAML_STYLE_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_DIGITS = {2: "01", 8: "01234567", 10: "0123456789", 16: "0123456789abcdefABCDEF"}
_INT64 = range(-(2**63), 2**63)
_UINT64 = range(0, 2**64)


def _go_parse_int(text: str) -> int | None:
    """strconv.ParseInt with base 0 (0x, 0o, 0b, and a leading 0 for octal), unbounded."""
    sign, body = 1, text
    if body[:1] in ("+", "-"):
        sign, body = (-1 if body[0] == "-" else 1), body[1:]
    if len(body) > 2 and body[0] == "0" and body[1] in "xXoObB":
        base, digits = {"x": 16, "o": 8, "b": 2}[body[1].lower()], body[2:]
    elif len(body) > 1 and body[0] == "0":
        base, digits = 8, body[1:]
    else:
        base, digits = 10, body
    if not digits or any(c not in _DIGITS[base] for c in digits):
        return None
    return sign * int(digits, base)


def _go_parse_float(text: str) -> float | None:
    """strconv.ParseFloat for decimal text; None where Go fails (also out of range)."""
    if "_" in text:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return None if math.isinf(value) else value


def _resolve_plain(text: str) -> Any:
    """A plain scalar as go-yaml v2 resolves it into an interface{}."""
    if text in _GO_YAML_WORDS:
        return _GO_YAML_WORDS[text]
    if text.startswith("."):
        value = _go_parse_float(text)
        return text if value is None else value
    if text[:1] not in ("+", "-") and not text[:1].isdigit():
        return text
    # (a date stays a string in an interface{}, and is never a number either)
    plain = text.replace("_", "")
    number = _go_parse_int(plain)
    if number is not None:
        if number in _INT64 or (number in _UINT64 and plain[:1] not in ("+", "-")):
            return number
    if _YAML_STYLE_FLOAT.fullmatch(plain):
        value = _go_parse_float(plain)
        if value is not None:
            return value
    return text


def _resolve_tagged(tag: str, text: str) -> Any:
    """A scalar with an explicit tag (!!int "4"): go-yaml resolves it and checks the type."""
    short = tag.removeprefix(_TAG)
    if short in ("str", "timestamp") or not tag.startswith(_TAG):
        return text
    if short == "binary":
        try:
            return base64.b64decode(text, validate=True).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            raise _PluginError("!!binary value contains invalid base64 data") from None
    value = _resolve_plain(text)
    if short == "float" and _is_number(value):
        return float(value)
    fits = {
        "int": _is_number(value) and isinstance(value, int),
        "bool": isinstance(value, bool),
        "null": value is None,
    }
    if not fits.get(short, False):
        raise _PluginError(f"cannot decode `{text}` as a !!{short}")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_key(key: Any) -> str:
    """A mapping key as sigs.k8s.io/yaml turns it into a JSON object key."""
    if isinstance(key, str):
        return key
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, int):
        return str(key)
    if isinstance(key, float):
        # never the name of a field, so Go's exact spelling (float32 %g) does not matter
        return f"{key:g}"
    raise _PluginError(f"a mapping key the plugin cannot use: {key!r}")


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    return str(value)


class _Reader:
    """One reading of one config: the values, then the decoding, then the meaning."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.ambiguous: list[str] = []
        # aliases can multiply a small text into a huge value; go-yaml stops too
        self.budget = _MAX_VALUES

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    # -- YAML to plain values (go-yaml v2 into interface{}), then to JSON values --------
    def load(self, text: str) -> Any:
        loader = _RawLoader(text)
        try:
            # go-yaml reads the first document and ignores the rest
            node = loader.get_node() if loader.check_node() else None
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise _PluginError(f"not valid YAML{where}: {e.problem}") from None
        except yaml.YAMLError as e:
            raise _PluginError(f"not valid YAML: {e}") from None
        finally:
            loader.dispose()
        return None if node is None else self._value(node, "")

    def _value(self, node: yaml.Node, path: str) -> Any:
        self.budget -= 1
        if self.budget < 0:
            raise _PluginError("the config has too many values (excessive aliasing?)")
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self._value(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if (
                isinstance(key_node, yaml.ScalarNode)
                and key_node.value == "<<"
                and key_node.tag in (_PLAIN, _TAG + "merge")
            ):
                self._merge(value_node, result, path)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise _PluginError(f"{path or 'the config'}: a mapping or list as a key")
            key = _json_key(self._scalar(key_node, path, check=False))
            where = f"{path}.{key}" if path else key
            if key in result:
                self.note(f"{where} is given twice: the plugin takes the last one")
            result[key] = self._value(value_node, where)
        return result

    def _merge(self, node: yaml.Node, into: dict, path: str) -> None:
        """A merge key (<<): go-yaml sets the merged keys over what came before."""
        if isinstance(node, yaml.MappingNode):
            into.update(self._value(node, path))
        elif isinstance(node, yaml.SequenceNode):
            for item in reversed(node.value):  # earlier mappings take precedence
                if not isinstance(item, yaml.MappingNode):
                    raise _PluginError("map merge requires map or sequence of maps as the value")
                into.update(self._value(item, path))
        else:
            raise _PluginError("map merge requires map or sequence of maps as the value")

    def _scalar(self, node: yaml.ScalarNode, path: str, check: bool = True) -> Any:
        if node.tag == _PLAIN:
            value = _resolve_plain(node.value)
            if check and path:
                self._note_surprise(node.value, value, path)
        elif node.tag == _TAG + "str" or node.tag == "!":
            value = node.value
        else:
            value = _resolve_tagged(node.tag, node.value)
        if check and isinstance(value, float) and not math.isfinite(value):
            # json.Marshal refuses NaN and infinities, wherever they are
            raise _PluginError(f"{path or 'the config'}: {node.value} has no JSON form")
        return value

    def _note_surprise(self, text: str, value: Any, path: str) -> None:
        """YAML 1.1 readings an admin may not expect (yes is true, 010 is 8)."""
        if isinstance(value, float) and not math.isfinite(value):
            return
        if isinstance(value, bool) and text not in _OBVIOUS_WORDS:
            self.note(f"{path}: {text} reads as {_describe(value)}")
        elif _is_number(value) and text.lstrip("+-") != _describe(value).lstrip("-"):
            self.note(f"{path}: {text} reads as the number {_describe(value)}")

    # -- JSON into the plugin's Go types (encoding/json) ------------------------------------
    def decode_config(self, value: Any) -> dict:
        return self._struct(value, "", _CONFIG, {})

    def _struct(self, value: Any, path: str, fields: dict[str, Callable], current: dict) -> dict:
        """encoding/json into a struct: keys in byte order, an exact name or else one
        equal under Unicode case folding; unknown keys are skipped."""
        if value is None:
            return current
        if not isinstance(value, dict):
            raise _PluginError(f"{path or 'the config'}: must be a mapping, not {_describe(value)}")
        result = dict(current)
        decoded_from: dict[str, str] = {}
        for key in sorted(value, key=lambda k: k.encode()):
            name = key if key in fields else _fold_match(key, fields)
            where = f"{path}.{key}" if path else key
            if name is None:
                self.note(_ignored(where, key, fields))
                continue
            if name in decoded_from:
                self.ambiguous.append(
                    f"{where} and {path + '.' if path else ''}{decoded_from[name]} are the same "
                    f"field to the plugin ({name})"
                )
            decoded_from[name] = key
            result[name] = fields[name](self, value[key], where, result.get(name))
        return result

    def _exact_keys(self, value: Any, path: str, known: tuple[str, ...]) -> dict:
        """Types that decode themselves through a map: exact key names, the rest ignored."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _PluginError(f"{path}: must be a mapping, not {_describe(value)}")
        for key in value:
            if key not in known:
                self.note(_ignored(f"{path}.{key}", key, dict.fromkeys(known), exact=True))
        return {k: v for k, v in value.items() if k in known}

    def version(self, value: Any, path: str, current: Any = None) -> Any:
        """Config.Version, the one string field sigs.k8s.io/yaml fills from a number too."""
        if _is_number(value) or isinstance(value, bool):
            return _describe(value)
        return self.string(value, path, current)

    # primitive Go types; JSON null leaves the current value
    def string(self, value: Any, path: str, current: Any = None) -> Any:
        if value is None:
            return current
        if not isinstance(value, str):
            raise _PluginError(f"{path}: must be a string, not {_describe(value)}")
        return value

    def boolean(self, value: Any, path: str, current: Any = None) -> Any:
        if value is None:
            return current
        if not isinstance(value, bool):
            raise _PluginError(f"{path}: must be true or false, not {_describe(value)}")
        return value

    def integer(self, value: Any, path: str, current: Any = None, unsigned: bool = False) -> Any:
        if value is None:
            return current
        number = _json_integer(value, unsigned)
        if number is None:
            kind = "a whole number of at least 0" if unsigned else "a whole number"
            raise _PluginError(f"{path}: must be {kind}, not {_describe(value)}")
        return number

    def slice_of(self, value: Any, path: str, decode: Callable) -> list | None:
        if value is None:
            return None
        if not isinstance(value, list):
            raise _PluginError(f"{path}: must be a list, not {_describe(value)}")
        return [decode(item, f"{path}[{i}]") for i, item in enumerate(value)]

    # the plugin's types
    def duration(self, value: Any, path: str, current: Any = None) -> Any:
        if _is_number(value):
            return value
        if isinstance(value, str) and (value == "infinite" or _GO_DURATION.fullmatch(value)):
            return value
        raise _PluginError(f"{path}: not a duration: {_describe(value)}")

    def device_list_strategy(self, value: Any, path: str, current: Any = None) -> Any:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(v is None or isinstance(v, str) for v in value):
            return [v or "" for v in value]
        raise _PluginError(f"{path}: invalid deviceListStrategy: {_describe(value)}")

    def resource_name(self, value: Any, path: str) -> str:
        if value is not None and not isinstance(value, str):
            raise _PluginError(f"{path}: must be a string, not {_describe(value)}")
        return _resource_name(value or "", path)

    def named_resource(self, value: Any, path: str) -> dict:
        # Resource.UnmarshalJSON: both fields must be there
        fields = self._exact_keys(value, path, ("pattern", "name"))
        for required in ("pattern", "name"):
            if required not in fields:
                raise _PluginError(f"{path}: resources must have a '{required}' field set")
        return {
            "pattern": self.string(fields["pattern"], f"{path}.pattern", ""),
            "name": self.resource_name(fields["name"], f"{path}.name"),
        }

    def replicated_resources(self, value: Any, path: str, current: Any = None) -> dict:
        """ReplicatedResources.UnmarshalJSON (a sharing section); null decodes as {}."""
        section = dict(current or {"renameByDefault": False, "failRequestsGreaterThanOne": None})
        fields = self._exact_keys(value, path, _REPLICATED_KEYS)
        section["renameByDefault"] = self.boolean(
            fields.get("renameByDefault", False),
            f"{path}.renameByDefault",
            section["renameByDefault"],
        )
        if "failRequestsGreaterThanOne" in fields:
            section["failRequestsGreaterThanOne"] = _ptr(_Reader.boolean)(
                self, fields["failRequestsGreaterThanOne"], f"{path}.failRequestsGreaterThanOne"
            )
        if "resources" not in fields:
            raise _PluginError(f"{path}: no resources specified")
        resources = self.slice_of(
            fields["resources"], f"{path}.resources", self.replicated_resource
        )
        if not resources:
            raise _PluginError(f"{path}.resources: no resources specified")
        for resource in resources:
            if section["renameByDefault"] and not resource["rename"]:
                resource["rename"] = resource["name"] + ".shared"
        section["resources"] = resources
        return section

    def replicated_resource(self, value: Any, path: str) -> dict:
        """ReplicatedResource.UnmarshalJSON: one entry of a sharing section's resources."""
        fields = self._exact_keys(value, path, ("name", "devices", "replicas", "rename"))
        if "name" not in fields:
            raise _PluginError(f"{path}: no resource name specified")
        resource = {"name": self.resource_name(fields["name"], f"{path}.name"), "rename": ""}
        resource["devices"] = self.devices(fields.get("devices", "all"), f"{path}.devices")
        if "replicas" not in fields:
            raise _PluginError(f"{path}: no replicas specified")
        replicas = self.integer(fields["replicas"], f"{path}.replicas", 0)
        if replicas < MIN_REPLICAS:
            raise _PluginError(
                f"{path}.replicas is {_describe(fields['replicas'])}: number of replicas must "
                "be >= 2 (leave the section out to stop sharing)"
            )
        resource["replicas"] = replicas
        if "rename" in fields:
            resource["rename"] = self.resource_name(fields["rename"], f"{path}.rename")
        return resource

    def devices(self, value: Any, path: str) -> Any:
        """ReplicatedDevices.UnmarshalJSON: "all", a count, or a list of GPUs."""
        if value is None or isinstance(value, str):
            if value != "all":
                raise _PluginError(
                    f"{path}: devices set as {_describe(value or '')} but the only valid string "
                    "input is 'all'"
                )
            return "all"
        count = _json_integer(value)
        if count is not None:
            if count <= 0:
                raise _PluginError(f"{path}: a count of devices must be > 0, not {count}")
            return count
        if isinstance(value, list):
            for item in value:
                if item is None or _json_integer(item, unsigned=True) is not None:
                    continue
                if isinstance(item, str) and _device_ref(item):
                    continue
                raise _PluginError(f"{path}: unsupported device in devices list: {_describe(item)}")
            return list(value)
        raise _PluginError(f"{path}: unrecognized type for devices spec: {_describe(value)}")

    # -- what the decoded config means -------------------------------------------------------
    def reading(self, config: dict) -> PluginReading:
        version = config.get("version") or "v1"
        if version != "v1":
            raise _PluginError(f'unknown version {version!r} (the plugin knows only "v1")')
        custom = config.get("resources") or {}
        if custom.get("gpus") or custom.get("mig"):
            self.note("resources: the plugin ignores custom resources (not supported yet)")
        sharing = config.get("sharing") or {}
        time_slicing = sharing.get("timeSlicing") or {"renameByDefault": False, "resources": []}
        mps = sharing.get("mps")
        if mps is not None and mps.get("failRequestsGreaterThanOne") is None:
            mps["failRequestsGreaterThanOne"] = True  # the plugin's default under MPS
        for name, section in (("timeSlicing", time_slicing), ("mps", mps)):
            self._drop_unsupported(name, section)
        # ReplicatedResources(): MPS whenever its section is there
        active = mps if mps is not None else time_slicing
        if mps is not None and time_slicing["resources"]:
            self.note("sharing.timeSlicing is ignored: with an mps section the plugin uses MPS")
        replicated = any(r["replicas"] > 1 for r in active["resources"])
        strategy = "mps" if mps is not None and replicated else "time-slicing"
        gpu_entries = [r for r in active["resources"] if r["name"] == GPU_RESOURCE]
        for entry in active["resources"]:
            if entry["name"] != GPU_RESOURCE and not entry["name"].startswith(
                RESOURCE_PREFIX + "mig-"
            ):
                self.note(
                    f"{entry['name']}: the plugin advertises no such resource, so this entry "
                    "shares nothing"
                )
        reading = PluginReading(notes=self.notes)
        reading.fail_requests_greater_than_one = bool(active.get("failRequestsGreaterThanOne"))
        if not gpu_entries:
            if active["resources"]:
                self.note("full GPUs (nvidia.com/gpu) are not shared: no entry names them")
        else:
            # GFD labels the first entry; the device map holds the most replicas
            first = gpu_entries[0]
            reading.sharing = Sharing(strategy, first["replicas"], bool(first["rename"]))
            reading.devices_per_gpu = max(r["replicas"] for r in gpu_entries)
            if len(gpu_entries) > 1:
                counts = ", ".join(str(r["replicas"]) for r in gpu_entries)
                if reading.devices_per_gpu != first["replicas"]:
                    reading.refusal = (
                        "unequal-duplicate-entries",
                        f"it has {len(gpu_entries)} entries for nvidia.com/gpu ({counts} "
                        f"replicas): the plugin advertises {reading.devices_per_gpu} slices per "
                        f"GPU, GPU feature discovery labels {first['replicas']}; keep one entry",
                    )
                else:
                    self.note(f"nvidia.com/gpu has {len(gpu_entries)} equal entries")
        if self.ambiguous:
            reading.refusal = (
                "ambiguous-keys",
                f"{self.ambiguous[0]}, and the plugin reads both: keep one spelling",
            )
        elif strategy == "mps" and reading.sharing.replicas > MPS_MAX_CLIENTS:
            reading.refusal = (
                "mps-clients",
                f"MPS with {reading.sharing.replicas} replicas: the device plugin's MPS control "
                f"daemon serves at most {MPS_MAX_CLIENTS} clients per GPU and would not start",
            )
        elif reading.devices_per_gpu > MAX_SLICES_PER_NODE:
            reading.refusal = (
                "too-many-slices",
                f"{reading.devices_per_gpu} slices per GPU do not fit the one message of at most "
                "4 MiB in which the plugin lists them to the kubelet (about "
                f"{MAX_SLICES_PER_NODE} per node): the node would offer no GPU",
            )
        return reading

    def _drop_unsupported(self, name: str, section: dict | None) -> None:
        """DisableResourceNamingInConfig: rename and devices are not supported yet."""
        if section is None:
            return
        for resource in section["resources"]:
            default = resource["name"] + ".shared" if section["renameByDefault"] else ""
            if resource["rename"] != default:
                self.note(
                    f"sharing.{name}.resources: the plugin ignores 'rename' "
                    "(renameByDefault names the shared resource)"
                )
                resource["rename"] = default
            if resource["devices"] != "all":
                self.note(
                    f"sharing.{name}.resources: the plugin ignores 'devices' and shares every GPU"
                )
                resource["devices"] = "all"


def _json_integer(value: Any, unsigned: bool = False) -> int | None:
    """A JSON number decoded into a Go int (or uint64): whole, and in range.

    A float in YAML (4.0) is written to JSON as 4 and decodes as an integer.
    """
    if isinstance(value, bool) or not _is_number(value):
        return None
    if isinstance(value, float):
        if not value.is_integer() or abs(value) >= 1e21:
            return None
        if unsigned and math.copysign(1, value) < 0:
            return None  # "-0" is not a uint
        value = int(value)
    return value if value in (_UINT64 if unsigned else _INT64) else None


_GO_DURATION = re.compile(r"[-+]?(0|(([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h))+)")
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
_UUID = re.compile(
    r"(\{)?(urn:uuid:)?[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?"
    r"[0-9a-fA-F]{12}(?(1)\})"
)


def _resource_name(raw: str, path: str) -> str:
    """NewResourceName: nvidia.com/ in front, at most 63 characters, a DNS subdomain."""
    name = raw if raw.startswith(RESOURCE_PREFIX) else RESOURCE_PREFIX + raw
    if len(name) > 63:
        raise _PluginError(f"{path}: resource name {name!r} is longer than 63 characters")
    short = name.split("/", 1)[1]
    if len(short) > 253 or not _DNS_SUBDOMAIN.fullmatch(short):
        raise _PluginError(
            f"{path}: incorrect format for resource name {name!r} (lower-case letters, digits, "
            "'-' and '.' after nvidia.com/)"
        )
    return name


def _uuid(text: str) -> bool:
    """google/uuid.Parse: 36 characters with dashes, or braces, urn:uuid: or 32 hex digits."""
    if len(text) == 32:
        return bool(re.fullmatch(r"[0-9a-fA-F]{32}", text))
    body = text
    if len(text) == 38 and text[0] == "{" and text[-1] == "}":
        body = text[1:-1]
    elif len(text) == 45 and text[:9].lower() == "urn:uuid:":
        body = text[9:]
    return bool(
        re.fullmatch(
            r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", body
        )
    )


def _device_ref(text: str) -> bool:
    """A GPU index, a MIG index (0:1), or a GPU or MIG UUID."""
    if re.fullmatch(r"[0-9]+", text) or re.fullmatch(r"[0-9]+:[0-9]+", text):
        return all(int(part) < 2**64 for part in text.split(":"))
    if text.startswith("GPU-"):
        return _uuid(text[4:])
    if text.startswith("MIG-"):
        rest = text[4:]
        if _uuid(rest):
            return True
        parts = rest.split("/", 2)
        return (
            len(parts) == 3
            and parts[0].startswith("GPU-")
            and _uuid(parts[0][4:])
            and all(re.fullmatch(r"[0-9]+", p) for p in parts[1:])
        )
    return False


def _fold(name: str) -> str:
    # Go folds the Kelvin sign to k and the long s to s; Python lowers the first only
    return name.replace("\u017f", "s").lower()


def _fold_match(key: str, fields: dict) -> str | None:
    folded = _fold(key)
    return next((name for name in fields if _fold(name) == folded), None)


def _ignored(where: str, key: str, fields: dict, exact: bool = False) -> str:
    """A note for a key the plugin skips, with the likely meant name."""
    if exact:
        same = _fold_match(key, fields)
        if same:
            return (
                f"{where} is ignored: here the plugin matches names exactly, and it is not {same!r}"
            )
    near = get_close_matches(_fold(key), [_fold(f) for f in fields], n=1, cutoff=0.75)
    hint = ""
    if near:
        hint = f" (did you mean {next(f for f in fields if _fold(f) == near[0])!r}?)"
    elsewhere = _FIELD_HOMES.get(_fold(key))
    if elsewhere and not hint:
        hint = f" (it belongs under {elsewhere})"
    return f"{where} is ignored: the plugin knows no such field{hint}"


# -- the plugin's types, field by field (v0.20.0; v0.19 lacks sharedDevicesAllocationPolicy) --
def _struct_of(fields: dict[str, Callable]) -> Callable:
    def decode(reader: _Reader, value: Any, path: str, current: Any = None) -> dict:
        return reader._struct(value, path, fields, current or {})

    return decode


def _slice(decode_item: Callable) -> Callable:
    def decode(reader: _Reader, value: Any, path: str, current: Any = None) -> list | None:
        return reader.slice_of(value, path, lambda item, where: decode_item(reader, item, where))

    return decode


_string, _boolean, _integer = _Reader.string, _Reader.boolean, _Reader.integer


def _ptr(decode: Callable) -> Callable:
    def decode_pointer(reader: _Reader, value: Any, path: str, current: Any = None) -> Any:
        return None if value is None else decode(reader, value, path, current)

    return decode_pointer


_REPLICATED_KEYS = ("renameByDefault", "failRequestsGreaterThanOne", "resources")
_PLUGIN_FLAGS = {
    "passDeviceSpecs": _ptr(_boolean),
    "deviceListStrategy": _ptr(_Reader.device_list_strategy),
    "deviceIDStrategy": _ptr(_string),
    "cdiAnnotationPrefix": _ptr(_string),
    "nvidiaCTKPath": _ptr(_string),
    "containerDriverRoot": _ptr(_string),
    "sharedDevicesAllocationPolicy": _ptr(_string),
}
_GFD_FLAGS = {
    "oneshot": _ptr(_boolean),
    "noTimestamp": _ptr(_boolean),
    "sleepInterval": _ptr(_Reader.duration),
    "outputFile": _ptr(_string),
    "machineTypeFile": _ptr(_string),
}
# Flags embeds CommandLineFlags: its fields sit directly under flags
_FLAGS = {
    "migStrategy": _ptr(_string),
    "failOnInitError": _ptr(_boolean),
    "mpsRoot": _ptr(_string),
    "nvidiaDriverRoot": _ptr(_string),
    "nvidiaDevRoot": _ptr(_string),
    "gdrcopyEnabled": _ptr(_boolean),
    "gdsEnabled": _ptr(_boolean),
    "mofedEnabled": _ptr(_boolean),
    "useNodeFeatureAPI": _ptr(_boolean),
    "deviceDiscoveryStrategy": _ptr(_string),
    "plugin": _ptr(_struct_of(_PLUGIN_FLAGS)),
    "gfd": _ptr(_struct_of(_GFD_FLAGS)),
}
_SHARING = {
    # a value, so null reaches its UnmarshalJSON (and fails); mps is a pointer
    "timeSlicing": lambda r, v, p, c=None: r.replicated_resources(v, p, c),
    "mps": _ptr(lambda r, v, p, c=None: r.replicated_resources(v, p, c)),
}
_CONFIG = {
    "version": _Reader.version,
    "flags": _struct_of(_FLAGS),
    "resources": _struct_of(
        {
            "gpus": _slice(lambda r, v, p: r.named_resource(v, p)),
            "mig": _slice(lambda r, v, p: r.named_resource(v, p)),
        }
    ),
    "sharing": _struct_of(_SHARING),
    "imex": _struct_of(
        {
            "channelIDs": _slice(lambda r, v, p: r.integer(v, p, 0)),
            "required": _boolean,
        }
    ),
}
# where a field that is unknown in one place does belong (k8s-device-plugin#1433)
_FIELD_HOMES = {
    _fold(name): home
    for home, names in (
        ("sharing.timeSlicing or sharing.mps", _REPLICATED_KEYS),
        ("flags", _FLAGS),
        ("flags.plugin", _PLUGIN_FLAGS),
        ("flags.gfd", _GFD_FLAGS),
        ("sharing", _SHARING),
    )
    for name in names
}
