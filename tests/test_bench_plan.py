"""The bench planner: cells, their hashes, and how the bench config is written into stage configs."""
import pytest

from conftest import REPO
from immunize.bench.cells import Cell, cell_digest
from immunize.bench.planner import attack_settings, build_plan, fmt_num
from immunize.bench.schema import parse
from immunize.bench.stages import apply_heldout, deep_merge, merge_section, set_dotted
from immunize.errors import UserError

QUICKSTART = REPO / "configs" / "bench" / "quickstart.yaml"


def _plan(*args):
    bench, _ = parse(["--config", str(QUICKSTART), *args])
    return build_plan(bench)


def _by_label(plan):
    return {c.label: c for c in plan.cells}


def test_quickstart_plan_shape():
    plan = _plan()
    labels = [c.label for c in plan.cells]
    assert labels[:3] == ["pretrain toy:tiny", "align", "defense seam"]
    # 2 defenses x (before-attack eval, 6 attacks + evals, benign + eval) + 2 fine-tuning defenses x 2 ratios x 2
    assert len(plan.cells) == 3 + 2 * (1 + 6 * 2 + 2) + 2 * 2 * 2
    assert len(plan.evals) == 2 * (1 + 6 + 1) + 4
    assert len({c.digest for c in plan.cells}) == len(plan.cells)
    # every cell comes after the cell whose model it reads
    position = {c.digest: i for i, c in enumerate(plan.cells)}
    assert all(position[c.input.digest] < position[c.digest] for c in plan.cells if isinstance(c.input, Cell))
    # the undefended defense is the aligned model itself, no stage of its own
    cells = _by_label(plan)
    assert cells["eval undefended (no attack)"].input is cells["align"]
    assert cells["finetune panacea p=0.1"].config["trainer"]["callbacks"][0]["class_path"] == "immunize.callbacks.Panacea"
    assert cells["finetune panacea p=0.3"].config["data"]["init_args"]["p"] == 0.3


def test_hashes_are_stable_and_follow_dependencies():
    a, b = _by_label(_plan()), _by_label(_plan())
    assert {k: c.digest for k, c in a.items()} == {k: c.digest for k, c in b.items()}
    # a different attack grid leaves every upstream stage (and the other attacks) where it was
    c = _by_label(_plan("--attack.lrs", "[3.0e-4, 1.0e-3, 1.0e-2]"))
    for label in ("pretrain toy:tiny", "align", "defense seam", "attack seam lr=1e-3", "eval attack seam lr=1e-3"):
        assert c[label].digest == a[label].digest
    assert "attack seam lr=1e-2" in c and "attack seam lr=3e-3" not in c
    # a change upstream changes everything downstream
    d = _by_label(_plan("--alignment.trainer", "{max_epochs: 1}"))
    assert d["pretrain toy:tiny"].digest == a["pretrain toy:tiny"].digest
    for label in ("align", "defense seam", "attack undefended lr=1e-3", "eval finetune sft p=0.1"):
        assert d[label].digest != a[label].digest


def test_digest_ignores_where_cells_live():
    cfg = {"model": {"class_path": "immunize.lightning_modules.SFT", "init_args": {"lr": 1e-3}}}
    up = Cell("fit", "pretrain", "p", cfg, "toy:tiny")
    assert cell_digest("fit", "attack", cfg, up) == Cell("fit", "attack", "x", cfg, up).digest
    assert cell_digest("fit", "attack", cfg, up) != cell_digest("fit", "attack", cfg, "toy:tiny")
    assert cell_digest("test", "eval", cfg, up) != cell_digest("fit", "eval", cfg, up)


def test_attack_settings_written_into_config():
    cfg = {"model": {"class_path": "immunize.lightning_modules.SFT", "init_args": {"lr": 1.0, "optimizer": "adamw"}},
           "data": {"class_path": "immunize.datamodules.SFTData", "init_args": {"train": [{"kind": "toy", "part": "harmful", "limit": 50}]}}}
    lora = {"r": 4}
    got = attack_settings(cfg, {"lr": 2e-4, "samples": None, "mode": "lora", "optimizer": "sgd"}, lora)
    assert got == {"lr": 2e-4, "samples": 50, "mode": "lora", "optimizer": "sgd"}
    assert cfg["model"]["init_args"] == {"lr": 2e-4, "optimizer": "sgd", "lora": {"r": 4}}
    attack_settings(cfg, {"lr": 1e-3, "samples": 8, "mode": "full", "optimizer": None}, lora)
    assert cfg["data"]["init_args"]["train"][0]["limit"] == 8 and cfg["model"]["init_args"]["lora"] is None
    cfg["data"]["init_args"]["train"].append({"kind": "toy"})
    with pytest.raises(UserError, match="one training source"):
        attack_settings(cfg, {"lr": 1e-3, "samples": 8, "mode": "full", "optimizer": None}, lora)


def test_merging_and_heldout_injection():
    base = {"class_path": "a.A", "init_args": {"x": 1, "y": {"z": 2}, "l": [1, 2]}}
    assert merge_section(base, {"init_args": {"y": {"w": 3}, "l": [9]}}) == \
        {"class_path": "a.A", "init_args": {"x": 1, "y": {"z": 2, "w": 3}, "l": [9]}}
    assert merge_section(base, {"class_path": "b.B"}) == {"class_path": "b.B"}
    assert deep_merge({"a": 1}, {"b": 2}) == {"a": 1, "b": 2}
    cfg = {"data": {"init_args": {"pairs": {"kind": "toy", "part": "pairs", "categories": "seen"},
                                  "benign": {"kind": "toy", "part": "benign"}}}}
    apply_heldout(cfg, ["self_harm"])
    assert cfg["data"]["init_args"]["pairs"]["heldout_categories"] == ["self_harm"]
    assert "heldout_categories" not in cfg["data"]["init_args"]["benign"]  # unaffected sources keep their hash
    d = {}
    set_dotted(d, "data.init_args.train", [{"limit": 1}])
    set_dotted(d, "data.init_args.train.0.limit", 5)
    assert d == {"data": {"init_args": {"train": [{"limit": 5}]}}}


def test_fmt_num():
    assert [fmt_num(x) for x in (1e-3, 2.5e-4, 0.1, 0.3, 200, 3e-3)] == ["1e-3", "2.5e-4", "0.1", "0.3", "200", "3e-3"]


def test_toy_source_needs_pretrain():
    with pytest.raises(UserError, match="model.pretrain"):
        _plan("--model.pretrain", "null")


def test_command_line_overrides_of_stage_sections():
    """jsonargparse hands `--x.trainer.max_epochs 4` to a dict field as "4" and drops `init_args.`; the
    schema puts both right, so the generated stage config reads as the YAML would."""
    bench, _ = parse(["--config", str(QUICKSTART), "--alignment.trainer.max_epochs", "4",
                      "--alignment.data.init_args.batch_size", "8", "--alignment.model.init_args.lr", "2e-3"])
    assert bench.alignment.trainer == {"max_epochs": 4}
    assert bench.alignment.data["init_args"]["batch_size"] == 8
    assert "batch_size" not in bench.alignment.data
    assert bench.alignment.model == {"init_args": {"lr": 2e-3}}
    align = _by_label(build_plan(bench))["align"].config
    assert align["trainer"]["max_epochs"] == 4 and align["data"]["init_args"]["batch_size"] == 8
    assert align["data"]["init_args"]["pairs"]["categories"] == "seen"  # the file's other settings stay


def test_a_sweep_expands_into_one_defense_per_setting_of_its_family():
    from immunize.bench.schema import parse

    bench, _ = parse(["--config", str(QUICKSTART), "--defenses",
                      "[{name: undefended}, {name: seam, sweep: {model.init_args.beta: [0.0, 1.0], "
                      "model.init_args.use_unlearning: [true, false]}}]"])
    names = [d.name for d in bench.defenses]
    assert names == ["undefended", "seam[beta=0,use_unlearning=True]", "seam[beta=0,use_unlearning=False]",
                     "seam[beta=1,use_unlearning=True]", "seam[beta=1,use_unlearning=False]"]
    assert all(d.family == "seam" for d in bench.defenses[1:])
    cells = _by_label(build_plan(bench))
    seam = cells["defense seam[beta=1,use_unlearning=False]"].config["model"]["init_args"]
    assert seam["beta"] == 1.0 and seam["use_unlearning"] is False and seam["alpha"] == 1.0  # merged over the registry's
    assert cells["defense seam[beta=1,use_unlearning=False]"].config["data"]["init_args"]["mode"] == "triplets"


def test_a_callback_sweep_starts_from_the_registry_callbacks():
    from immunize.bench.registry import registry_callbacks
    from immunize.bench.schema import DefenseSpec, expand_sweep

    points = expand_sweep(DefenseSpec(name="panacea", sweep={"callbacks.0.init_args.lam": [0.0, 1e-3]}), registry_callbacks)
    assert [p.name for p in points] == ["panacea[lam=0]", "panacea[lam=1e-3]"]
    rho = registry_callbacks("panacea")[0]["init_args"]["rho"]
    assert points[0].callbacks[0]["init_args"]["lam"] == 0.0 and points[0].callbacks[0]["init_args"]["rho"] == rho
    with pytest.raises(UserError, match="sweep key"):
        expand_sweep(DefenseSpec(name="seam", sweep={"beta": [1.0]}))


def test_eval_lm_eval_reaches_every_eval_cell_and_is_checked_first():
    pytest.importorskip("lm_eval")
    from immunize.bench.validate import validate

    spec = "{tasks: [toy_mc], limit: 10}"
    plan = _plan("--eval.lm_eval", spec)
    assert all(c.config["model"]["init_args"]["lm_eval"] == {"tasks": ["toy_mc"], "limit": 10} for c in plan.evals)
    fits = {c.label: c.digest for c in _plan().cells if c.stage != "eval"}
    assert {c.label: c.digest for c in plan.cells if c.stage != "eval"} == fits, "lm-eval changes only the eval cells"
    bench, _ = parse(["--config", str(QUICKSTART), "--eval.lm_eval", "{tasks: [no_such_task_xyz]}"])
    with pytest.raises(UserError, match="no_such_task_xyz"):
        validate(bench)


def test_a_changed_computation_renames_only_the_cells_that_use_it(monkeypatch):
    """A cell whose config uses a computation listed in COMPUTATION_VERSIONS (a method class, warmup) changes its
    name when that computation's version is bumped; cells that do not use it keep theirs."""
    from immunize import fingerprint as cells  # the versions live in the fingerprint; cell_digest reads them

    tar = {"model": {"class_path": "immunize.lightning_modules.TAR", "init_args": {"lr": 1e-4}}}
    warm = {"model": {"class_path": "immunize.lightning_modules.SEAM", "init_args": {"warmup_ratio": 0.1}}}
    plain = {"model": {"class_path": "immunize.lightning_modules.SFT", "init_args": {"warmup_ratio": 0.0}}}
    before = {name: cell_digest("fit", "defense", cfg, "toy:tiny") for name, cfg in
              (("tar", tar), ("warm", warm), ("plain", plain))}
    assert cells.computation_versions(tar) == {"TAR": cells.COMPUTATION_VERSIONS["TAR"]}
    assert cells.computation_versions(plain) == {}
    monkeypatch.setitem(cells.COMPUTATION_VERSIONS, "TAR", 99)
    monkeypatch.setitem(cells.COMPUTATION_VERSIONS, "warmup", 99)
    assert cell_digest("fit", "defense", tar, "toy:tiny") != before["tar"]
    assert cell_digest("fit", "defense", warm, "toy:tiny") != before["warm"]
    assert cell_digest("fit", "defense", plain, "toy:tiny") == before["plain"]


def test_reference_attack_protocol_axes_keep_our_cells_and_attack_with_the_defense_rows():
    ours = _by_label(_plan())
    both = _by_label(_plan("--attack.data_from", "[heldout, defense]", "--attack.loss_on", "[response, all]"))
    label = "attack seam lr=1e-3 loss_on=response data_from=heldout"
    assert both[label].digest == ours["attack seam lr=1e-3"].digest  # our protocol's cells keep their names
    assert both[f"eval {label}"].meta["attack"] == ours["eval attack seam lr=1e-3"].meta["attack"]
    reference = both["attack seam lr=1e-3 loss_on=all data_from=defense"]
    data = reference.config["data"]["init_args"]
    assert data["loss_on"] == "all" and data["pairs_use"] == "harmful"
    defense_pairs = both["defense seam"].config["data"]["init_args"]["pairs"]
    assert {k: v for k, v in data["train"][0].items() if k != "limit"} == \
        {k: v for k, v in defense_pairs.items() if k != "limit"}  # the defense's own harmful rows (split align)
    assert data["train"][0]["limit"] == 200  # the attack's sample count: the first 200 of them
    assert both["eval attack seam lr=1e-3 loss_on=all data_from=defense"].meta["attack"] == \
        {"lr": 1e-3, "samples": 200, "mode": "full", "optimizer": "adamw", "loss_on": "all", "data_from": "defense"}


def test_attacked_on_attacks_a_defense_on_its_part_of_the_grid_only():
    from immunize.bench.validate import check_config

    grid = ["--attack.loss_on", "[response, all]", "--attack.data_from", "[heldout, defense]"]
    spec = ("[{name: undefended}, {name: seam, attacked_on: [{lrs: [1.0e-3], loss_on: [all], data_from: [defense]}, "
            "{lrs: [1.0e-2], loss_on: [response], data_from: [heldout]}]}]")
    plan = _plan(*grid, "--defenses", spec)
    attacks = [c.label for c in plan.cells if c.stage == "attack"]
    assert sorted(a for a in attacks if "seam" in a) == ["attack seam lr=1e-2 loss_on=response data_from=heldout",
                                                          "attack seam lr=1e-3 loss_on=all data_from=defense"]
    assert len([a for a in attacks if "undefended" in a]) == 6 * 2 * 2  # the reference keeps the whole grid
    full = _by_label(_plan(*grid))
    assert all(full[c.label].digest == c.digest for c in plan.cells)  # the same cells, fewer of them
    for bad, match in (("{lrs: [5.0e-5]}", "attacked_on.lrs"), ("{steps: [3]}", "axis 'steps'"),
                       ("{loss_on: sequence}", "attacked_on.loss_on")):
        bench, _ = parse(["--config", str(QUICKSTART), *grid, "--defenses",
                          f"[{{name: undefended}}, {{name: seam, attacked_on: {bad}}}]"])
        with pytest.raises(UserError, match=match):
            check_config(bench)


def test_safe_lora_gets_the_base_model_the_alignment_started_from(tmp_path):
    """A fine-tuning callback with `base_model: null` (SafeLoRA's toy config) is given the unaligned base: the pretrain
    cell's export, named by the cell (so the digest follows it) and resolved to its path when the cell runs; a model
    source without pretrain is given as is, with its GGUF file. The other fine-tune cells keep their names."""
    from immunize.bench.runner import runtime_config
    from immunize.bench.validate import check_cells

    lora = "{init_args: {lora: {r: 4, target_modules: [q_proj, v_proj]}}}"
    defenses = "[{name: sft}, {name: safe_lora}]"
    bench, _ = parse(["--config", str(QUICKSTART), "--finetune.defenses", defenses, "--finetune.model", lora])
    plan = build_plan(bench)
    cells = _by_label(plan)
    cell = cells["finetune safe_lora p=0.1"]
    args = cell.config["trainer"]["callbacks"][0]["init_args"]
    assert args["base_model"] == f"cell:{cells['pretrain toy:tiny'].name}" and "base_gguf_file" not in args
    assert cell.config["model"]["init_args"]["lora"]["r"] == 4
    run = runtime_config(cell, tmp_path, False, 0)
    assert run["trainer"]["callbacks"][0]["init_args"]["base_model"] == \
        str(tmp_path.resolve() / cells["pretrain toy:tiny"].name / "model")
    check_cells(plan, bench)  # the filled config builds (SafeLoRA refuses a null base_model)
    # sft's cells are those of a bench without SafeLoRA
    alone = _by_label(build_plan(parse(["--config", str(QUICKSTART), "--finetune.defenses", "[{name: sft}]",
                                        "--finetune.model", lora])[0]))
    assert cells["finetune sft p=0.1"].digest == alone["finetune sft p=0.1"].digest
    # another pretrain -> another base -> another SafeLoRA cell
    other = _by_label(build_plan(parse(["--config", str(QUICKSTART), "--finetune.defenses", defenses,
                                        "--finetune.model", lora, "--model.pretrain.trainer", "{max_epochs: 1}"])[0]))
    assert other["finetune safe_lora p=0.1"].digest != cell.digest

    source = _by_label(build_plan(parse(["--config", str(QUICKSTART), "--finetune.defenses", defenses,
                                         "--model.source", "some/hub-model", "--model.gguf_file", "m.gguf",
                                         "--model.pretrain", "null"])[0]))
    args = source["finetune safe_lora p=0.1"].config["trainer"]["callbacks"][0]["init_args"]
    assert args["base_model"] == "some/hub-model" and args["base_gguf_file"] == "m.gguf"
