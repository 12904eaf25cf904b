"""The hub's start_timeout grows by the time in line only for profiles with a GPU.

The hub reads ``start_timeout`` as soon as ``start()`` returns, before the
profile is applied; the spawner works out from the chosen profile whether the
spawn may wait in line (``run_pre_spawn_hook``, which the hub awaits first).
"""

from __future__ import annotations

from unittest.mock import Mock

import pytest
from jupyterhub.objects import Hub
from traitlets.config import Config

from jupyterhub_gpushare.objects import profile_gpu_slices
from jupyterhub_gpushare.spawner import GPUShareSpawner

KUBECONFIG = """\
apiVersion: v1
kind: Config
current-context: nowhere
contexts: [{name: nowhere, context: {cluster: nowhere, user: nowhere}}]
clusters: [{name: nowhere, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: nowhere, user: {token: unused}}]
"""

PROFILES = [
    {"display_name": "CPU", "slug": "cpu", "kubespawner_override": {"gpu_slices": 0}},
    {"display_name": "GPU", "slug": "gpu", "default": True},
    {
        "display_name": "Pick",
        "slug": "pick",
        "kubespawner_override": {"gpu_slices": 0},
        "profile_options": {
            "size": {
                "display_name": "Size",
                "choices": {
                    "none": {"display_name": "No GPU", "default": True},
                    "one": {"display_name": "1 slice", "kubespawner_override": {"gpu_slices": 1}},
                },
            }
        },
    },
]


@pytest.fixture
async def spawner(tmp_path, monkeypatch):
    # a spawner needs a kube config to exist; this one points nowhere and is never used
    from kubernetes_asyncio.config import kube_config

    (tmp_path / "kubeconfig").write_text(KUBECONFIG)
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "kubeconfig"))
    c = Config()
    c.KubeSpawner.start_timeout = 300
    c.KubeSpawner.profile_list = PROFILES
    c.GPUShareSpawner.queue_url = "http://127.0.0.1:9"
    c.GPUShareSpawner.queue_timeout = 1800
    user = Mock(name="user", id=1, url="/user/u/", escaped_name="u", settings={})
    user.name = "u"
    return GPUShareSpawner(config=c, _mock=True, user=user, hub=Hub(), api_token="unused")


@pytest.mark.parametrize(
    "options,expected",
    [
        ({"profile": "cpu"}, 300),
        ({"profile": "gpu"}, 300 + 1800),
        ({}, 300 + 1800),  # the default profile has a GPU
        ({"profile": "pick"}, 300),  # its default choice has none
        ({"profile": "pick", "size": "one"}, 300 + 1800),
    ],
)
async def test_only_gpu_profiles_get_the_time_in_line(spawner, options, expected):
    spawner.user_options = options
    await spawner.run_pre_spawn_hook()
    assert spawner.start_timeout == expected


async def test_the_extension_does_not_pile_up_over_spawns(spawner):
    for _ in range(3):
        spawner.user_options = {"profile": "gpu"}
        await spawner.run_pre_spawn_hook()
    assert spawner.start_timeout == 300 + 1800


def test_a_typed_in_or_callable_choice_is_unknown_in_advance():
    profile = {
        "kubespawner_override": {"gpu_slices": lambda spawner: 2},
        "profile_options": {},
    }
    assert profile_gpu_slices(profile, {}, 1) is None
    typed = {
        "profile_options": {
            "n": {"unlisted_choice": {"kubespawner_override": {"gpu_slices": "{value}"}}}
        }
    }
    assert profile_gpu_slices(typed, {"n--unlisted-choice": "3"}, 1) is None
