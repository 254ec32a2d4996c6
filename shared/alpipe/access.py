"""Who is calling: bearer tokens to principals (the admin or a labeler), and what each may do.

Pure functions over Settings; the API's dependencies (services/api/deps.py) turn their answers
into 401/403 responses. With no admin token and no labelers configured, authentication is off
(local/dev mode): every caller acts as the admin and names itself as a labeler, as before.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from .config import Settings
from .errors import UserError
from .projects import ANONYMOUS_LABELER as ANONYMOUS

ADMIN = "admin"
ALL_PROJECTS = "*"


class Forbidden(UserError):
    """A known caller asking for something it is not allowed to do: 403."""


@dataclass(frozen=True)
class Principal:
    """The caller: its name (a labeler's, or 'admin'), whether it is the admin, its projects.

    auth is False in local/dev mode (authentication off), where the caller acts as the admin and
    the labeler name comes from the request.
    """

    name: str
    is_admin: bool
    projects: list[str] = field(default_factory=lambda: [ALL_PROJECTS])
    auth: bool = True

    def can_access(self, project: str) -> bool:
        return self.is_admin or ALL_PROJECTS in self.projects or project in self.projects


DEV_PRINCIPAL = Principal(name=ANONYMOUS, is_admin=True, projects=[ALL_PROJECTS], auth=False)


def auth_enabled(settings: Settings) -> bool:
    return bool(settings.admin_token or settings.labelers)


def check_access_config(settings: Settings) -> None:
    """Refuse a configuration that cannot work as intended (UserError naming the problem)."""
    tokens: dict[str, str] = {}
    if settings.admin_token:
        tokens[settings.admin_token] = ADMIN
    for name, grant in settings.labelers.items():
        if name == ADMIN:
            raise UserError(f"ALPIPE_LABELERS: '{ADMIN}' is the name of the admin token's holder; "
                            "give the labeler another name")
        if not name.strip() or name != name.strip() or len(name) > 200:
            raise UserError(f"ALPIPE_LABELERS: labeler name {name!r} must be 1 to 200 characters, "
                            "without leading or trailing spaces")
        if not grant.projects:
            raise UserError(f"ALPIPE_LABELERS: labeler {name!r} has no projects; list some, or '*' for all")
        if grant.token in tokens:
            raise UserError(f"ALPIPE_LABELERS: labeler {name!r} has the same token as {tokens[grant.token]!r}; "
                            "every token must be different")
        tokens[grant.token] = name


def authenticate(settings: Settings, token: str | None) -> Principal | None:
    """The principal of a bearer token; None for a missing or unknown one (DEV_PRINCIPAL with auth off).

    Every configured token is compared, each in constant time, so the answer's timing says
    nothing about which token (or how much of one) matched.
    """
    if not auth_enabled(settings):
        return DEV_PRINCIPAL
    if not token:
        return None
    given = token.encode()
    found: Principal | None = None
    if settings.admin_token and secrets.compare_digest(given, settings.admin_token.encode()):
        found = Principal(name=ADMIN, is_admin=True)
    for name, grant in settings.labelers.items():
        if secrets.compare_digest(given, grant.token.encode()) and found is None:
            found = Principal(name=name, is_admin=False, projects=list(grant.projects))
    return found


def require_admin(principal: Principal, action: str) -> None:
    """Forbidden unless the principal is the admin; action says what was asked ('POST /projects')."""
    if not principal.is_admin:
        raise Forbidden(f"{action} is for the admin only; labeler {principal.name!r} may list, query and "
                        "label its projects")


def require_project(principal: Principal, project: str) -> None:
    if not principal.can_access(project):
        raise Forbidden(f"labeler {principal.name!r} has no access to project {project!r}")


def labeler_name(principal: Principal, requested: str | None) -> str:
    """Who labels: the token's holder (a different requested name is Forbidden); with auth off,
    the requested name or 'anonymous'."""
    if not principal.auth:
        return requested or ANONYMOUS
    if requested is not None and requested != principal.name:
        raise Forbidden(f"you are {principal.name!r} and cannot label as {requested!r}; leave 'labeler' out "
                        "or send your own name")
    return principal.name
