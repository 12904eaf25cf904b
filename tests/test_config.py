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
