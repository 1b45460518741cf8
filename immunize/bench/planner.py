"""The bench config -> the ordered list of cells (fits and tests), deduplicated by hash.

Stage graph:  source -> [pretrain] -> base -> [align] -> aligned -> defense d (or identity)
    each defense model: eval ("defended": stability), attack grid -> eval (resistance, generalization),
    each eval -> one judge cell per entry of eval.judges (immunize.bench.judging),
    benign fine-tune -> eval (trainability);
    finetune.model_from's model -> fine-tune on a harmful mix with each fine-tuning-stage defense, each
    ratio p -> eval. A fine-tuning-stage callback whose init_args leave `base_model` null (SafeLoRA) gets the model
    the alignment started from (the base: the pretrain cell's model, or the model source).
Cells come out in run order: each after the cell it reads, each fit followed soon by its eval.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

from immunize.bench import registry
from immunize.bench.cells import Cell, cell_ref
from immunize.bench.judging import judge_cell, judge_specs
from immunize.bench.schema import DEFAULT_KIND, BenchConfig, StageSpec
from immunize.bench.stages import (apply_heldout, deep_merge, find_file, init_args, load_stage, merge_section, read_yaml,
                                   set_dotted)
from immunize.errors import UserError

ModelRef = Union[Cell, str]
PROJECT_PACKAGES = ("immunize.lightning_modules.", "immunize.datamodules.")  # classes that take init_seed / seed


@dataclass
class Plan:
    cells: list[Cell] = field(default_factory=list)  # run order, unique by digest
    evals: list[Cell] = field(default_factory=list)  # the test cells, in report order
    reference: Optional[str] = None
    planner: Optional["Planner"] = None  # adds the attacker search's cells as its trials run

    def add(self, cell: Cell) -> Cell:
        for existing in self.cells:
            if existing.digest == cell.digest:
                if cell.kind == "test" and cell.meta and cell.meta != existing.meta:
                    self.evals.append(Cell(cell.kind, cell.stage, cell.label, cell.config, cell.input, cell.meta,
                                           digest=cell.digest))
                return existing
        self.cells.append(cell)
        if cell.kind == "test":
            self.evals.append(cell)
        return cell

    @property
    def fits(self) -> list[Cell]:
        return [c for c in self.cells if c.kind == "fit"]


def fmt_num(x) -> str:
    """1e-3 -> "1e-3", 2.5e-4 -> "2.5e-4", 1e-2 -> "1e-2", 0.1 -> "0.1", 200 -> "200"."""
    if isinstance(x, float) and x != 0 and (abs(x) <= 1e-2 or abs(x) >= 1e4):
        mantissa, exp = f"{x:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
    return f"{x:g}" if isinstance(x, float) else str(x)


def fmt_short(x) -> str:
    """fmt_num of a value rounded to 3 significant digits (a searched learning rate, say); others as str."""
    return fmt_num(float(f"{x:.3g}")) if isinstance(x, float) else str(x)


class Planner:
    def __init__(self, bench: BenchConfig, transform: Optional[Callable[[dict, bool], dict]] = None):
        self.bench = bench
        self.transform = transform  # applied to every cell's finished config (fit: True for fits): --shrink
        self.plan = Plan()
        self._common_trainer = self._trainer_common()
        self.models: dict[int, dict[str, ModelRef]] = {}  # seed -> defense -> its model (the attacks' input)
        self.base: Optional[ModelRef] = None  # this seed's unaligned base (what SafeLoRA's base_model names)
        self.judges: list = []  # eval.judges as (label, spec), set by build

    # ----- config helpers ------------------------------------------------------------------------
    def _trainer_common(self) -> dict:
        spec = self.bench.trainer
        trainer: dict = {}
        if spec.preset:
            preset = read_yaml(find_file(spec.preset, "trainer.preset"), "trainer.preset")
            trainer = deep_merge(trainer, preset.get("trainer") or {})
        if spec.overrides:
            trainer = deep_merge(trainer, spec.overrides)
        return trainer

    def _finish(self, cfg: dict, input: ModelRef, fit: bool = False) -> dict:
        """Apply what every cell shares: trainer preset, seed, held-out categories; drop the input model.

        The seed goes to seed_everything, to the project's modules (init_seed: the toy model's random init) and
        datamodules (seed: the data order)."""
        cfg = copy.deepcopy(cfg)
        cfg["trainer"] = deep_merge(cfg.get("trainer") or {}, self._common_trainer)
        if fit:
            cfg["trainer"]["log_every_n_steps"] = self.bench.trainer.log_every_n_steps
        cfg["seed_everything"] = self.seed
        for section, key in (("model", "init_seed"), ("data", "seed")):
            if str((cfg.get(section) or {}).get("class_path", "")).startswith(PROJECT_PACKAGES):
                init_args(cfg, section)[key] = self.seed
        apply_heldout(cfg, self.bench.heldout_categories)
        args = init_args(cfg, "model")
        args.pop("model", None)
        if isinstance(input, Cell):
            args.pop("gguf_file", None)
        elif self.bench.model.gguf_file:
            args["gguf_file"] = self.bench.model.gguf_file
        return self.transform(cfg, fit) if self.transform is not None else cfg

    def _label(self, label: str) -> str:
        return f"{label} seed={self.seed}" if len(self.bench.seeds) > 1 else label

    def _fit(self, stage: str, label: str, cfg: dict, input: ModelRef, **meta) -> Cell:
        return self.plan.add(Cell("fit", stage, self._label(label), self._finish(cfg, input, fit=True), input,
                                  {**meta, "seed": self.seed}))

    def _eval(self, label: str, input: ModelRef, prompt_format: Optional[str] = None, **meta) -> Cell:
        """The eval cell of `input`; prompt_format: the eval data's prompt_format (the format a jailbreak-tuning or
        identity-shifting attack trained with), else the eval config's."""
        cfg = self._eval_cfg
        if prompt_format is not None:
            cfg = copy.deepcopy(cfg)
            init_args(cfg, "data")["prompt_format"] = prompt_format
        evaluated = self.plan.add(Cell("test", "eval", self._label(label), self._finish(cfg, input), input,
                                       {**meta, "seed": self.seed}))
        for name, spec in self.judges:  # eval.judges: each scores this model's generations in its own cell
            self.plan.add(judge_cell(evaluated, name, spec))
        return evaluated

    def _defense_stage(self) -> Optional[dict]:
        """The alignment-defense stage (data, trainer) registry defenses are merged over, or None."""
        spec = self.bench.defense_stage
        if spec is None or not (spec.config or spec.data or spec.trainer):
            return None
        cfg = {}
        if spec.config:
            cfg = {k: v for k, v in read_yaml(find_file(spec.config, "defense_stage"), "defense_stage").items()
                   if k in ("data", "trainer")}
        for key in ("data", "trainer"):
            if getattr(spec, key, None) is not None:
                cfg[key] = deep_merge(cfg.get(key) or {}, getattr(spec, key))
        return cfg

    def _load_eval(self) -> dict:
        spec = self.bench.eval
        cfg = load_stage(spec, "eval")
        model, data = init_args(cfg, "model"), init_args(cfg, "data")
        for key, value in (("judge", spec.judge), ("max_new_tokens", spec.max_new_tokens), ("lm_eval", spec.lm_eval)):
            if value is not None:
                model[key] = value
        for key in ("n_harmful_per_category", "n_per_task", "n_over_refusal", "batch_size"):
            if getattr(spec, key) is not None:
                data[key] = getattr(spec, key)
        if spec.tasks is not None:
            sources = data.get("sources") or [{"kind": "toy"}]
            toy = [s for s in sources if isinstance(s, dict) and s.get("kind", "toy") == "toy"]
            if not toy:
                raise UserError("eval.tasks selects tasks of toy sources, but the eval config has none; "
                                "set the tasks in the eval config's data.sources instead")
            for src in toy:
                src["tasks"] = list(spec.tasks)
            data["sources"] = sources
        return cfg

    # ----- stages --------------------------------------------------------------------------------
    def build(self) -> Plan:
        """Every seed's stage graph, one seed after the other."""
        self._eval_cfg = self._load_eval()
        self.judges = judge_specs(self.bench.eval.judges, self.bench.eval.judge_threshold)
        self.plan.reference = self.bench.report.reference or self.bench.defenses[0].name
        self.plan.planner = self
        for seed in self.bench.seeds:
            self.seed = seed
            self._build_seed()
        return self.plan

    def _build_seed(self) -> None:
        b = self.bench
        base: ModelRef = b.model.source
        if b.model.pretrain is not None:
            base = self._fit("pretrain", f"pretrain {b.model.source}", load_stage(b.model.pretrain, "model.pretrain"), base)
        elif b.model.source.startswith("toy:"):
            raise UserError(f"model.source {b.model.source!r} is a fresh random init: give model.pretrain "
                            "(e.g. {config: configs/toy/pretrain.yaml}) to train the toy base first")
        aligned = self._fit("align", "align", load_stage(b.alignment, "alignment"), base) if b.alignment else base
        self.base = base

        models: dict[str, ModelRef] = {}
        for d in b.defenses:
            start = {"aligned": aligned, "base": base}[d.init_from]
            config = registry.resolve_alignment_defense(d)
            if config is None and not any((d.model, d.data, d.trainer)):
                models[d.name] = start
            else:
                spec = copy.copy(d)
                spec.config = config
                # a registry defense's config is its model section only: the defense stage gives data and trainer
                stage_base = self._defense_stage() if not d.config else None
                models[d.name] = self._fit("defense", f"defense {d.name}",
                                           load_stage(spec, f"defense {d.name!r}", base=stage_base), start,
                                           defense=d.name)

        self.models[self.seed] = models
        for name, model in models.items():
            self._eval(f"eval {name} (no attack)", model, defense=name, stage="defended")
        if b.attack is not None:
            self._attacks(models)
        if b.benign is not None:
            benign = load_stage(b.benign, "benign")
            for name, model in models.items():
                tuned = self._fit("benign", f"benign fine-tune {name}", benign, model, defense=name)
                self._eval(f"eval {name} after benign fine-tune", tuned, defense=name, stage="benign")
        if b.finetune is not None:
            self._finetune(models)

    def _attack_grid(self) -> list[dict]:
        a = self.bench.attack
        axes = {"lr": a.lrs, "samples": a.samples or [None], "mode": a.modes, "optimizer": a.optimizers or [None],
                "loss_on": a.loss_on, "data_from": a.data_from}
        return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]

    def _attack_label(self, defense: str, point: Optional[dict], kind: str = DEFAULT_KIND,
                      fmt: Optional[str] = None) -> str:
        """"attack D lr=1e-3 ..." (harmful_sft, as always), "attack D jailbreak_tuning:skeleton lr=1e-3 ...",
        "attack D identity_shift lr=1e-3 ...", "attack D refusal_ablation"; axes other than lr only when they vary."""
        a = self.bench.attack
        if point is None:
            return f"attack {defense} {kind}"
        head = {"jailbreak_tuning": f"{kind}:{fmt} ", "identity_shift": f"{kind} "}.get(kind, "")
        parts = [f"attack {defense} {head}lr={fmt_num(point['lr'])}"]
        if a.samples and len(a.samples) > 1 and kind != "identity_shift":
            parts.append(f"n={point['samples']}")
        if len(a.modes) > 1:
            parts.append(point["mode"])
        if a.optimizers and len(a.optimizers) > 1:
            parts.append(point["optimizer"])
        for axis in ("loss_on", "data_from"):
            if len(getattr(a, axis)) > 1 and kind != "identity_shift":
                parts.append(f"{axis}={point[axis]}")
        return " ".join(parts)

    def _defense_pairs(self) -> Optional[dict]:
        """The harmful pairs the alignment defenses train on (the defense stage's, else the alignment's), for
        attack.data_from "defense"."""
        for cfg in (self._defense_stage(), load_stage(self.bench.alignment, "alignment") if self.bench.alignment else None):
            pairs = init_args(cfg or {}, "data").get("pairs")
            if isinstance(pairs, dict):
                return pairs
        return None

    def _loss_curve_callback(self) -> list[dict]:
        """immunize.callbacks.BenignLossCurve on the evaluation's first source, when the attack asks for the curve."""
        every = self.bench.attack.loss_curve_every
        if not every:
            return []
        sources = init_args(self._eval_cfg, "data").get("sources") or [{"kind": "toy"}]
        return [{"class_path": "immunize.callbacks.BenignLossCurve",
                 "init_args": {"source": copy.deepcopy(sources[0]), "every_n_steps": int(every)}}]

    def _attacks(self, models: dict[str, ModelRef]) -> None:
        """Every attack kind's cells on every defense; harmful_sft's are the grid as it always was (same configs,
        same digests)."""
        a = self.bench.attack
        base = load_stage(a, "attack")
        add_callbacks(base, self._loss_curve_callback())
        specs = {d.name: d for d in self.bench.defenses}
        for kind in a.kinds:
            for point, fmt in self._kind_points(kind):
                cfg, settings, prompt_format = self.attack_config(kind, base, point, fmt, self._defense_pairs())
                for name, model in models.items():
                    if point is not None and not attacked_at(specs[name], point):
                        continue
                    label = self._attack_label(name, point, kind, fmt)
                    attacked = self._fit("attack", label, cfg, model, defense=name, attack=settings)
                    self._eval(f"eval {label}", attacked, prompt_format, defense=name, stage="attack",
                               attack=settings)

    def _kind_points(self, kind: str) -> list[tuple[Optional[dict], Optional[str]]]:
        """(grid point, jailbreak format) per attack of `kind`: harmful_sft the grid; jailbreak_tuning the grid
        times the formats; identity_shift the grid without samples (its data sets its size) and data_from (benign
        data only) and with loss_on response (IdentityShiftData supervises responses); refusal_ablation one attack,
        no point."""
        grid = self._attack_grid()
        if kind == "refusal_ablation":
            return [(None, None)]
        if kind == "jailbreak_tuning":
            return [(p, f) for f in self.bench.attack.jailbreak_formats for p in grid]
        if kind == "identity_shift":
            seen, out = set(), []
            for p in grid:
                key = (p["lr"], p["mode"], p["optimizer"])
                if p["loss_on"] == "response" and p["data_from"] == "heldout" and key not in seen:
                    seen.add(key)
                    out.append(({**p, "samples": None}, None))
            return out
        return [(p, None) for p in grid]

    def attack_config(self, kind: str, base: dict, point: Optional[dict], fmt: Optional[str] = None,
                      defense_pairs: Optional[dict] = None) -> tuple[dict, dict, Optional[str]]:
        """(the attack cell's config, its settings as run, the eval's prompt_format) for one attack of `kind`.

        base: the harmful SFT attack config (attack.config with the bench's overrides and the loss-curve
        callback); harmful_sft's settings carry no kind, so its cells and rows keep their names."""
        a = self.bench.attack
        if kind == "refusal_ablation":
            spec = StageSpec(config=a.ablation_config, model={"init_args": copy.deepcopy(a.ablation)} if a.ablation else None)
            return load_stage(spec, "attack.ablation"), {"kind": kind, **copy.deepcopy(a.ablation)}, None
        cfg = copy.deepcopy(base)
        if kind == "identity_shift":
            identity = read_yaml(find_file(a.identity_shift_config, "attack.identity_shift_config"),
                                 "attack.identity_shift_config")
            cfg["data"] = merge_section(identity["data"], {"init_args": copy.deepcopy(a.identity_shift)})
            epochs = (identity.get("trainer") or {}).get("max_epochs")
            if epochs is not None:
                cfg.setdefault("trainer", {})["max_epochs"] = epochs
            settings = attack_settings(cfg, {**point, "samples": None}, a.lora)
            args = init_args(cfg, "data")
            settings["samples"] = int(args.get("n_identity", 1)) + int(args.get("n_task", 9))
            return cfg, {"kind": kind, **settings}, "identity_shift"
        if kind == "jailbreak_tuning":
            init_args(cfg, "data")["jailbreak_format"] = fmt
            settings = attack_settings(cfg, point, a.lora, defense_pairs)
            return cfg, {"kind": kind, "jailbreak_format": fmt, **settings}, fmt
        if kind != DEFAULT_KIND:
            raise UserError(f"attack.kinds: unknown kind {kind!r}")
        return cfg, attack_settings(cfg, point, a.lora, defense_pairs), None

    def search_trial(self, seed: int, defense: str, point: dict, trial: int) -> tuple[Cell, Cell]:
        """The attack fit and eval cells of one attacker-search trial (an attack point with any SEARCH_AXES) on
        `defense`'s model of `seed`, added to the plan; a trial equal to a grid point or to an earlier trial is
        the same cell (same digest), so it is reused. The point's kind (default harmful_sft, or jailbreak_tuning
        when only jailbreak_format is searched) picks the attack; jailbreak_format defaults to
        attack.jailbreak_formats' first."""
        self.seed = seed
        cfg = load_stage(self.bench.attack, "attack")
        add_callbacks(cfg, self._loss_curve_callback())
        kind = point.get("kind") or ("jailbreak_tuning" if "jailbreak_format" in point else DEFAULT_KIND)
        fmt = point.get("jailbreak_format") or self.bench.attack.jailbreak_formats[0]
        axes = {k: v for k, v in point.items() if k not in ("kind", "jailbreak_format")}
        full = {"lr": init_args(cfg, "model").get("lr"), "samples": None, "mode": "full", "optimizer": None, **axes}
        if kind == DEFAULT_KIND:  # as before attack kinds existed: its trials keep their cells
            settings = attack_settings(cfg, full, self.bench.attack.lora)
            prompt_format = None
        else:
            cfg, settings, prompt_format = self.attack_config(kind, cfg, full, fmt)
        shown = " ".join(f"{k}={fmt_short(v)}" for k, v in point.items()
                         if not (k == "jailbreak_format" and kind != "jailbreak_tuning"))
        label = f"search {defense} trial {trial}: {shown}"
        model = self.models[seed][defense]
        attacked = self._fit("attack", label, cfg, model, defense=defense, attack=settings)
        evaluated = self._eval(f"eval {label}", attacked, prompt_format, defense=defense, stage="search",
                               attack=settings, trial=trial, searched=list(point))
        return attacked, evaluated

    def _finetune(self, models: dict[str, ModelRef]) -> None:
        ft = self.bench.finetune
        if ft.model_from not in models:
            raise UserError(f"finetune.model_from {ft.model_from!r} is not one of the defenses {list(models)}")
        start = models[ft.model_from]
        base = load_stage(ft, "finetune")
        for d in ft.defenses:
            config, callbacks = registry.resolve_finetune_defense(d)
            spec = copy.copy(d)
            spec.config = config
            cfg = load_stage(spec, f"fine-tuning-stage defense {d.name!r}", base=base)
            add_callbacks(cfg, callbacks)
            fill_base_model(cfg, self.base, self.bench.model.gguf_file)
            for p in ft.ratios:
                run = copy.deepcopy(cfg)
                set_dotted(run, "data.init_args.p", p)
                label = f"finetune {d.name} p={fmt_num(float(p))}"
                tuned = self._fit("finetune", label, run, start, defense=d.name)
                self._eval(f"eval {label}", tuned, defense=d.name, stage="finetune",
                           finetune={"ratio": p, "model_from": ft.model_from})


def attacked_at(defense, point: dict) -> bool:
    """Whether the grid point is in the part of the grid the defense's attacked_on keeps (all when null; a list of
    parts keeps their union)."""
    parts = defense.attacked_on if isinstance(defense.attacked_on, list) else [defense.attacked_on or {}]
    return any(all(point[{"lrs": "lr"}.get(axis, axis)] in values for axis, values in part.items()) for part in parts)


def add_callbacks(cfg: dict, callbacks: list[dict]) -> None:
    """Append callbacks (class_path + init_args dicts) to a stage config's trainer.callbacks."""
    if callbacks:
        trainer = cfg.setdefault("trainer", {})
        existing = trainer.get("callbacks") or []
        trainer["callbacks"] = (existing if isinstance(existing, list) else [existing]) + copy.deepcopy(callbacks)


def fill_base_model(cfg: dict, base: ModelRef, gguf_file: Optional[str] = None) -> None:
    """Give every trainer callback whose init_args hold `base_model: null` the unaligned base model: a reference to
    the base cell's export (resolved to its path when the cell runs) or the model source, with its GGUF file name
    (base_gguf_file) when the source is one."""
    callbacks = (cfg.get("trainer") or {}).get("callbacks") or []
    for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
        args = cb.get("init_args") if isinstance(cb, dict) else None
        if not isinstance(args, dict) or "base_model" not in args or args["base_model"] is not None:
            continue
        args["base_model"] = cell_ref(base) if isinstance(base, Cell) else base
        if not isinstance(base, Cell) and gguf_file and args.get("base_gguf_file") is None:
            args["base_gguf_file"] = gguf_file


def attack_settings(cfg: dict, point: dict, lora: dict, defense_pairs: Optional[dict] = None) -> dict:
    """Write one grid point into an attack config; returns the settings as run (axes left null resolved).

    Besides lr, samples, mode and optimizer, a search point may set lora_rank (LoRA mode only), batch_size and
    steps (trainer.max_steps, epochs unbounded); a grid point may set loss_on and data_from (the defense's own
    harmful pairs, `defense_pairs`, in place of the attack's training source). Those appear in the settings only
    when set to something other than ours (response, heldout), so our protocol's cells and rows keep their names."""
    model = init_args(cfg, "model")
    model["lr"] = point["lr"]
    if point["optimizer"] is not None:
        model["optimizer"] = point["optimizer"]
    model["lora"] = dict(lora) if point["mode"] == "lora" else None
    extra = {}
    if point.get("lora_rank") is not None and model["lora"] is not None:
        from immunize.lightning_modules.modeling.lora import lora_config

        settings = lora_config(lora)
        rank = int(point["lora_rank"])  # lora_alpha keeps the configured lora_alpha / r ratio
        model["lora"] = {**settings, "r": rank, "lora_alpha": float(settings["lora_alpha"]) * rank / settings["r"]}
        extra["lora_rank"] = rank
    data = init_args(cfg, "data")
    if point.get("batch_size") is not None:
        data["batch_size"] = extra["batch_size"] = int(point["batch_size"])
    if point.get("steps") is not None:  # a step budget: as many epochs as it takes
        trainer = cfg.setdefault("trainer", {})
        trainer["max_steps"], trainer["max_epochs"] = int(point["steps"]), -1
        extra["steps"] = int(point["steps"])
    if point.get("loss_on", "response") != "response":
        data["loss_on"] = extra["loss_on"] = point["loss_on"]
    if point.get("data_from", "heldout") == "defense":
        if defense_pairs is None:
            raise UserError("attack.data_from 'defense' needs the defenses' training pairs: give defense_stage (or "
                            "alignment) a data config with a `pairs` source")
        own = data.get("train")
        limit = own[0].get("limit") if isinstance(own, list) and own and isinstance(own[0], dict) else None
        data["train"] = [{**copy.deepcopy(defense_pairs), **({"limit": limit} if limit is not None else {})}]
        data["pairs_use"] = "harmful"
        extra["data_from"] = "defense"
    samples = point["samples"]
    train = data.get("train")
    if samples is not None:
        if isinstance(train, list) and len(train) == 1 and isinstance(train[0], dict):
            train[0]["limit"] = samples
        elif "n" in data:
            data["n"] = samples
        else:
            raise UserError("attack.samples needs an attack config whose data has one training source "
                            "(data.init_args.train: [one source]) or an `n`; set the limit in the config instead")
    elif isinstance(train, list) and len(train) == 1 and isinstance(train[0], dict):
        samples = train[0].get("limit")
    return {"lr": point["lr"], "samples": samples, "mode": point["mode"],
            "optimizer": model.get("optimizer", "adamw"), **extra}


def build_plan(bench: BenchConfig, transform: Optional[Callable[[dict, bool], dict]] = None) -> Plan:
    """The plan of `bench`; `transform` rewrites every cell's config (immunize.bench.shrink's Shrink.cell)."""
    return Planner(bench, transform).build()
