"""Tokens to principals, and what a principal may do (alpipe.access), without a server."""

from __future__ import annotations

import pytest

from alpipe import access
from alpipe.config import Settings

GRANTS = {"ada": {"token": "t-ada", "projects": ["digits", "pets"]}, "bob": {"token": "t-bob"}}


def settings(**fields) -> Settings:
    return Settings(_env_file=None, **fields)


def test_auth_is_off_without_tokens() -> None:
    off = settings()
    assert not access.auth_enabled(off)
    for token in (None, "", "anything"):
        assert access.authenticate(off, token) == access.DEV_PRINCIPAL
    assert access.DEV_PRINCIPAL.is_admin and not access.DEV_PRINCIPAL.auth
    assert access.labeler_name(access.DEV_PRINCIPAL, None) == "anonymous"
    assert access.labeler_name(access.DEV_PRINCIPAL, "zoe") == "zoe"


def test_tokens_name_their_holder() -> None:
    on = settings(admin_token="t-admin", labelers=GRANTS)
    assert access.auth_enabled(on) and access.auth_enabled(settings(labelers=GRANTS))
    admin = access.authenticate(on, "t-admin")
    assert (admin.name, admin.is_admin, admin.projects, admin.auth) == ("admin", True, ["*"], True)
    ada = access.authenticate(on, "t-ada")
    assert (ada.name, ada.is_admin, ada.projects) == ("ada", False, ["digits", "pets"])
    assert access.authenticate(on, "t-bob").projects == ["*"]
    for unknown in (None, "", "t-ad", "t-ada ", "T-ADA", "t-admin2"):
        assert access.authenticate(on, unknown) is None


def test_what_a_labeler_may_do() -> None:
    on = settings(admin_token="t-admin", labelers=GRANTS)
    ada, bob, admin = (access.authenticate(on, t) for t in ("t-ada", "t-bob", "t-admin"))
    assert ada.can_access("pets") and not ada.can_access("secret")
    assert bob.can_access("secret") and admin.can_access("secret")
    with pytest.raises(access.Forbidden, match="labeler 'ada' has no access to project 'secret'"):
        access.require_project(ada, "secret")
    access.require_project(ada, "pets")
    with pytest.raises(access.Forbidden, match=r"^POST /projects is for the admin only; labeler 'bob'"):
        access.require_admin(bob, "POST /projects")
    access.require_admin(admin, "POST /projects")
    assert access.labeler_name(ada, None) == access.labeler_name(ada, "ada") == "ada"
    assert access.labeler_name(admin, None) == "admin"
    with pytest.raises(access.Forbidden, match="you are 'ada' and cannot label as 'bob'"):
        access.labeler_name(ada, "bob")
    with pytest.raises(access.Forbidden, match="cannot label as 'ada'"):
        access.labeler_name(admin, "ada")
