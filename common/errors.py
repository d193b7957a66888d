"""Exceptions for problems a user can fix (bad config, missing data, budget).

The CLI turns every :class:`UserError` into one line on stderr and a non-zero
exit status, never a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input that they can fix."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names setting, value and what is allowed."""

    def __init__(self, setting: str, value: object, allowed: str) -> None:
        self.setting = setting
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid setting '{setting}' = {value!r}: {allowed}")


class DataError(UserError):
    """Data files are missing, corrupt or do not fit the requested split.

    Its message may quote a silo's data (a cell, a file name): it stays on the silo's own log.
    ``public=True`` marks a message that names nothing of the data (it may reach the server)."""

    def __init__(self, message: str, *, public: bool = False) -> None:
        super().__init__(message)
        self.public = public


def read_toml(path: str, error: type[UserError] = UserError, *, what: str = "") -> dict:
    """The TOML file ``path`` as a dict; a missing or unreadable file is ``error`` naming the
    file (``what`` says what kind of file it is: "sweep file", "schema")."""
    import tomllib

    name = f"{what} {path}" if what else path
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise error(f"{name} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{name} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise error(f"{name} cannot be read: {exc}") from None


class BudgetError(UserError):
    """The requested privacy budget cannot be met, or a step would exceed it."""


class ModelError(UserError):
    """The model is unsuitable for per-sample DP (e.g. it contains BatchNorm)."""
