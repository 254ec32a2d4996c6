"""Errors a user can fix: the CLI prints their message on one line and exits non-zero."""


class UserError(Exception):
    """Bad input from the user (unknown name, empty folder, impossible budget...)."""


class NotFound(UserError):
    """A project, sample, object or version that does not exist."""


class StoreUnavailable(UserError):
    """The object store cannot be reached or refuses to work (not: a key that does not exist).

    The API answers 503 with Retry-After; nothing reads an unavailable store as empty."""
