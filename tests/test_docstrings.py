"""Every public constructor documents each of its arguments in an `Args:` block (that is what `immunize fit --help`
shows), and the CLI shows them."""
import inspect
import re

import pytest

from immunize import callbacks, datamodules, judges, lightning_modules
from immunize.datamodules.toy.oracle import OracleJudge


def _public_classes():
    for package in (lightning_modules, callbacks, datamodules):
        for name in package.__all__:
            obj = getattr(package, name)
            if inspect.isclass(obj):
                yield f"{package.__name__}.{name}", obj
    for cls in (judges.KeywordRefusalJudge, judges.ClassifierJudge, judges.ModerationJudge, OracleJudge):
        yield f"{cls.__module__}.{cls.__name__}", cls


def documented(cls) -> set[str]:
    doc = inspect.getdoc(cls) or ""
    if "Args:" not in doc:
        return set()
    names = re.findall(r"^\s{0,8}(\**[A-Za-z_][\w, *]*):", doc.split("Args:", 1)[1], re.M)
    return {part.strip().lstrip("*") for n in names for part in n.split(",")}


@pytest.mark.parametrize("name, cls", list(_public_classes()), ids=lambda x: x if isinstance(x, str) else "")
def test_constructor_arguments_are_documented(name, cls):
    if "__init__" not in vars(cls):
        pytest.skip(f"{name} inherits its constructor (and its Args) from {cls.__mro__[1].__name__}")
    params = [p for p in inspect.signature(cls.__init__).parameters.values()
              if p.name != "self" and p.kind is not p.VAR_POSITIONAL]
    missing = [p.name for p in params if p.name not in documented(cls)]
    assert not missing, f"{name}: no Args entry for {missing}"


def test_cli_help_shows_the_args(cli):
    result = cli("fit", "--model.help", "immunize.lightning_modules.TAR")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "SGD steps of the simulated attack" in result.stdout
