"""One exception type for bad user input, turned into a one-line message and exit code 2 by the CLI."""
from __future__ import annotations

from typing import Optional


class UserError(Exception):
    """Bad input from the user (config, data, paths): the message names the thing and the fix."""

    last: Optional["UserError"] = None

    def __init__(self, message: str):
        super().__init__(message)
        # Config parsers may re-wrap exceptions raised while instantiating classes; the CLI finds it here.
        UserError.last = self


def require(condition: bool, message: str) -> None:
    """Raise UserError(message) unless condition holds."""
    if not condition:
        raise UserError(message)


def find_user_error(err: BaseException) -> Optional[UserError]:
    """The UserError behind `err`: itself, one in its cause chain, or the last one raised if its text was wrapped."""
    seen = err
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__cause__ or seen.__context__
    last = UserError.last
    if last is not None and str(last) in str(err):
        return last
    return None
