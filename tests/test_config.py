"""configure(c): the service, its role and the user scope, on JupyterHub 5 and 6."""

from __future__ import annotations

import pytest
from traitlets.config import Config

from jupyterhub_gpushare import config as gpushare_config


@pytest.fixture(params=[5, 6])
def major(request, monkeypatch):
    monkeypatch.setattr(gpushare_config, "_jupyterhub_major", lambda: request.param)
    return request.param


def test_service_role_and_user_scope(major, monkeypatch):
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    c = Config()
    c.JupyterHub.services = [{"name": "other", "api_token": "x"}]
    gpushare_config.configure(c, url="http://hub:10101")

    services = {s["name"]: s for s in c.JupyterHub.services}
    assert set(services) == {"other", "gpushare"}
    service = services["gpushare"]
    assert service["url"] == "http://hub:10101"
    assert service["command"][1:] == ["-m", "jupyterhub_gpushare.service"]
    assert service["environment"]["KUBERNETES_SERVICE_HOST"] == "10.0.0.1"
    assert service["environment"]["KUBERNETES_SERVICE_PORT"] == "443"
    secret = service["environment"]["GPUSHARE_HUB_SECRET"]
    assert len(secret) >= 32 and c.GPUShareSpawner.queue_secret == secret
    assert c.GPUShareSpawner.queue_url == "http://127.0.0.1:10101"

    roles = {r["name"]: r for r in c.JupyterHub.load_roles}
    assert roles["gpushare-service"]["scopes"] == [
        "list:users",
        "read:users:activity",
        "read:servers",
    ]
    access = "access:services!service=gpushare"
    if major >= 6:
        assert c.JupyterHub.extra_user_scopes == {access}
        assert "user" not in roles
    else:
        assert roles["user"]["scopes"] == ["self", access]
    assert c.JupyterHub.spawner_class == "gpushare.GPUShareSpawner"
    assert c.JupyterHub.template_paths[0].endswith("jupyterhub_gpushare/templates")


def test_existing_user_role_is_extended_not_replaced(major):
    c = Config()
    c.JupyterHub.load_roles = [{"name": "user", "scopes": ["self", "read:groups"]}]
    gpushare_config.configure(c)
    user = next(r for r in c.JupyterHub.load_roles if r["name"] == "user")
    assert user["scopes"] == ["access:services!service=gpushare", "read:groups", "self"]


def test_running_twice_changes_nothing(major):
    c = Config()
    gpushare_config.configure(c)
    first = (list(c.JupyterHub.services), list(c.JupyterHub.load_roles))
    gpushare_config.configure(c)
    assert [s["name"] for s in c.JupyterHub.services] == [s["name"] for s in first[0]]
    assert len(c.JupyterHub.load_roles) == len(first[1])


def test_admin_spawner_choice_is_kept(major):
    c = Config()
    c.JupyterHub.spawner_class = "mypackage.MySpawner"
    gpushare_config.configure(c)
    assert c.JupyterHub.spawner_class == "mypackage.MySpawner"


def test_the_hubs_spawn_limit_moves_to_the_spawner(major):
    # z2jh sets 64 before hub.extraConfig runs configure(c)
    c = Config()
    c.JupyterHub.concurrent_spawn_limit = 64
    gpushare_config.configure(c)
    assert c.JupyterHub.concurrent_spawn_limit == 0
    assert c.GPUShareSpawner.concurrent_start_limit == 64
    # a second call keeps it; an admin's own choice is kept too
    gpushare_config.configure(c)
    assert c.GPUShareSpawner.concurrent_start_limit == 64
    c = Config()
    c.GPUShareSpawner.concurrent_start_limit = 10
    gpushare_config.configure(c)
    assert c.GPUShareSpawner.concurrent_start_limit == 10


def test_jupyterhubs_default_limit_when_none_is_set(major):
    from jupyterhub.app import JupyterHub

    c = Config()
    gpushare_config.configure(c)
    assert c.GPUShareSpawner.concurrent_start_limit == JupyterHub().concurrent_spawn_limit


def test_service_settings_in_the_hub_config_reach_the_service(major, monkeypatch):
    import json

    from jupyterhub_gpushare.service.app import CONFIG_ENV, GPUShareService

    c = Config()
    c.Dispatcher.hold_seconds = 600
    c.QueueStore.state_file = "/srv/queue.json"
    c.JupyterHub.log_level = "INFO"  # not the service's
    gpushare_config.configure(c)
    service = next(s for s in c.JupyterHub.services if s["name"] == "gpushare")
    forwarded = json.loads(service["environment"][CONFIG_ENV])
    assert forwarded == {
        "Dispatcher": {"hold_seconds": 600},
        "QueueStore": {"state_file": "/srv/queue.json"},
    }
    # and the service reads them
    monkeypatch.setenv(CONFIG_ENV, service["environment"][CONFIG_ENV])
    app = GPUShareService()
    app.initialize([])
    assert app.config.Dispatcher.hold_seconds == 600


def test_unserialisable_service_settings_are_refused_clearly(major):
    from jupyterhub_gpushare.objects import GPUShareConfigError

    c = Config()
    c.Dispatcher.hold_seconds = object()
    with pytest.raises(GPUShareConfigError, match="must be plain values"):
        gpushare_config.configure(c)


def test_service_pages_get_tokens_that_can_show_admin_views(major):
    c = Config()
    gpushare_config.configure(c)
    service = next(s for s in c.JupyterHub.services if s["name"] == "gpushare")
    assert set(service["oauth_client_allowed_scopes"]) == {
        "list:users",
        "read:servers",
        "read:users:activity",
    }
