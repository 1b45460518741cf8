"""Every public constructor documents each of its arguments in an `Args:` block (that is what `immunize fit --help`
shows), and the CLI shows them."""
import inspect
import re

import pytest

from immunize import callbacks, datamodules, judges, lightning_modules
from immunize.datamodules.toy.oracle import OracleJudge
from immunize.judges import guards, presets


def _public_classes():
    for package in (lightning_modules, callbacks, datamodules):
        for name in package.__all__:
            obj = getattr(package, name)
            if inspect.isclass(obj):
                yield f"{package.__name__}.{name}", obj
    for cls in (judges.KeywordRefusalJudge, judges.ClassifierJudge, judges.ModerationJudge, OracleJudge,
                guards.WildGuardJudge, guards.Qwen3GuardJudge, presets.Preset):
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
    assert "steps of the simulated attack per outer step" in result.stdout


def test_every_bench_field_is_described():
    """`immunize bench --help` shows each field's description from the schema's Args: blocks."""
    import dataclasses

    from immunize.bench import schema

    for cls in (schema.StageSpec, schema.ModelSource, schema.DefenseSpec, schema.AttackSearch, schema.AttackGrid,
                schema.FinetuneStage, schema.EvalSpec, schema.TrainerSpec, schema.LauncherSpec, schema.WandbSpec,
                schema.ReportSpec, schema.BenchConfig):
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in documented(cls)]
        assert not missing, f"{cls.__name__}: no Args entry for {missing}"


def test_immunize_help_names_every_command_and_bench_help_describes_fields(cli_server, tmp_path):
    from immunize.main import COMMANDS

    top = cli_server.run("--help", cwd=tmp_path)
    assert top.returncode == 0 and not top.stderr.strip()
    assert all(f"  {name} " in top.stdout for name in COMMANDS)
    bench = cli_server.run("bench", "--help", cwd=tmp_path)
    assert bench.returncode == 0 and not bench.stderr.strip()
    text = " ".join(bench.stdout.split())
    assert "--eval.n_per_task N_PER_TASK benign items per task (>= 0)." in text
    assert "--progress {auto,bars,lines,quiet}" in text
    bad = cli_server.run("bench", "--launcher.name", "kube", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "immunize: error: launcher.name: 'kube' is not one of local, slurm, ray (see --help)"
