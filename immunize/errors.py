"""One exception type for bad user input, turned into a one-line message and exit code 2 by the CLI, and the stream
rule that keeps that line alone on stderr."""
from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
from typing import Iterator, NoReturn, Optional


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


_NOISE = ("Does not validate", "Subtypes:", "Errors:", "Given value", "- Expected a <class 'NoneType'>")


_CHOICE = re.compile(r"Expected a (?:typing\.)?Literal\[(?P<allowed>[^\]]*)\]\. Got value: (?P<value>.*?)(?:$| \()")
_KEY = re.compile(r'Parser key "([^"]+)"')


def summarize_parser_error(text: str) -> str:
    """jsonargparse's nested multi-line report, squeezed to the lines that say what is wrong; a value outside a
    field's choices becomes "key: 'value' is not one of a, b, c"."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    kept = " ".join(line.lstrip("- ") for line in lines if not line.startswith(_NOISE))
    choice = _CHOICE.search(kept)
    if choice:
        key = ".".join(_KEY.findall(kept[:choice.start()])) or "a field"
        allowed = ", ".join(v.strip().strip("'\"") for v in choice.group("allowed").split(","))
        return f"{key}: {choice.group('value').strip()!r} is not one of {allowed} (see --help)"
    return kept[:400] + " (see --help, or --print_config for the valid keys)"


def fail(message: str, program: str = "immunize") -> NoReturn:
    """Print one line and exit with code 2 (bad input)."""
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def errors_only_on_stderr() -> Iterator[None]:
    """While inside: what Python writes to stderr (warnings, Lightning's and transformers' log lines, progress bars)
    goes to stdout instead, so that a failure's one `immunize: error:` line, printed after leaving, is the only line
    on stderr. Tracebacks of real bugs still reach stderr (the exception leaves the block first)."""
    real = sys.stderr
    rerouted = []
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (real, sys.__stderr__) \
                    and isinstance(vars(type(handler)).get("stream"), (type(None),)):  # not lastResort (follows sys.stderr)
                rerouted.append((handler, handler.stream))
                handler.setStream(sys.stdout)
    sys.stderr = sys.stdout
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr = real
        for handler, stream in rerouted:
            handler.setStream(stream)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one `immunize: error:` line and exit code 2 (argparse prints usage lines too)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see `{self.prog} --help`)")
