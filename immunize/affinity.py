"""Safety affinity of a learned Panacea perturbation: where eps sits, layer by layer, and what it does there.

For each parameter group (transformer layer i, and each tensor outside the layers: embeddings, final
norm, lm_head) it reports |eps| in that group and the harmful score / capability of the fine-tuned model
with eps added to that group only; rows "none" (no eps) and "all" (the Panacea model) frame them.
Evaluation is the project's test loop (EvalData + CausalLMModule.test_step), configured by an eval YAML.

Which weights: eps files written by immunize.callbacks.Panacea hold eps on the tensors that trained (metadata
"trainable"). For full fine-tuning those are the exported model's own parameters. For LoRA they are
A/B matrices that no longer exist in the exported (merged) model, so the file also holds, under the
merged parameter names, the change eps made to each merged weight; those are what is applied here,
and the LoRA eps norms are reported alongside. --model is by default the Panacea export itself
(eps already in it): the "none" model is then model - eps. Pass --no-eps-applied for a model without eps.

    python -m immunize.affinity --model runs/toy/ft_panacea \
        --eps runs/toy/ft_panacea/version_0/panacea_eps.safetensors --out runs/toy/affinity
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional

import torch
import yaml

from immunize.bench.stages import find_file
from immunize.errors import UserError
from immunize.io import atomic_write_json, atomic_write_text

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def load_eps(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of an eps file written by immunize.callbacks.Panacea."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise UserError(f"eps file {path} not found; Panacea writes it to <log dir>/panacea_eps.safetensors")
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def split_eps(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[dict, dict]:
    """(weight-space eps keyed by exported parameter names, eps on the trained tensors)."""
    trainable = [n for n in metadata.get("trainable", "").split(",") if n]
    trained = {n: tensors[n] for n in trainable if n in tensors} or dict(tensors)
    if metadata.get("space") == "lora":
        return {k: v for k, v in tensors.items() if k not in trained}, trained
    return trained, trained


def group_of(name: str) -> str:
    """"layer 3" for a transformer layer's tensor; otherwise the tensor's module ("embed_tokens", "lm_head")."""
    m = _LAYER.search(name)
    if m:
        return f"layer {int(m.group(1))}"
    name = re.sub(r"\.(weight|bias)$", "", name)
    return re.sub(r"^(base_model\.model\.)?(model\.)?", "", name)


def group_norms(eps: dict[str, torch.Tensor]) -> dict[str, float]:
    """L2 norm of eps per group, groups in first-seen order."""
    sq: dict[str, float] = {}
    for n, e in eps.items():
        g = group_of(n)
        sq[g] = sq.get(g, 0.0) + float(e.double().pow(2).sum())
    return {g: v ** 0.5 for g, v in sq.items()}


def _eval_parts(eval_config: Path, model_dir: str):
    """(CausalLMModule, EvalData, trainer kwargs) from a LightningCLI-style eval YAML, with model = model_dir."""
    from immunize.datamodules import EvalData, Source
    from immunize.lightning_modules import CausalLMModule

    eval_config = find_file(str(eval_config), "--eval-config")
    cfg = yaml.safe_load(eval_config.read_text()) or {}
    model_args = dict((cfg.get("model") or {}).get("init_args") or {})
    model_args.pop("lora", None)
    model_args["model"] = model_dir
    data_args = dict((cfg.get("data") or {}).get("init_args") or {})
    data_args["sources"] = [Source(**s) for s in data_args.get("sources") or [{"kind": "toy"}]]
    trainer_cfg = cfg.get("trainer") or {}
    trainer_kw = {"accelerator": trainer_cfg.get("accelerator", "auto"), "devices": 1,
                  "precision": trainer_cfg.get("precision", "32-true")}
    return CausalLMModule(**model_args), EvalData(**data_args), trainer_kw


def _evaluate(module, data, trainer_kw: dict, root: Path) -> dict:
    import lightning as L

    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(root), **trainer_kw)
    trainer.test(module, datamodule=data, verbose=False)
    return dict(module.test_results)


def safety_affinity(model_dir: str, eps_file: str, out_dir: str, eval_config: str = "configs/eval/toy.yaml",
                    eps_applied: bool = True) -> list[dict]:
    """Evaluate none / each group alone / all of eps; returns one row per evaluation and writes the report."""
    out = Path(out_dir)
    tensors, metadata = load_eps(eps_file)
    eps, trained = split_eps(tensors, metadata)
    module, data, trainer_kw = _eval_parts(Path(eval_config), model_dir)
    params = dict(module.model.named_parameters())
    missing = [n for n in eps if n not in params or params[n].shape != eps[n].shape]
    if missing:
        raise UserError(f"eps tensor {missing[0]} has no matching parameter in {model_dir}; was eps saved from a fit of this model?")
    with torch.no_grad():
        base = {n: params[n].detach().float().clone() - (eps[n] if eps_applied else 0) for n in eps}

    def run(label: str, groups: Optional[set]) -> dict:
        with torch.no_grad():
            for n, e in eps.items():
                on = groups is None or group_of(n) in groups
                params[n].copy_((base[n] + e if on else base[n]).to(params[n].dtype))
        return _evaluate(module, data, trainer_kw, out / "evals" / label.replace(" ", "_"))

    norms, raw_norms = group_norms(eps), group_norms(trained) if trained is not eps else {}
    total = sum(v * v for v in norms.values()) or 1.0
    none = run("none", set())
    rows = [{"group": "none", "eps_norm": 0.0, "eps_share": 0.0, **none}]
    for g, norm in norms.items():
        row = {"group": g, "eps_norm": norm, "eps_share": norm * norm / total, **run(g, {g})}
        if raw_norms:
            row["trained_eps_norm"] = raw_norms.get(g, 0.0)
        rows.append(row)
    rows.append({"group": "all", "eps_norm": total ** 0.5, "eps_share": 1.0, **run("all", None)})
    for row in rows:
        row["harmful_delta"] = row.get("harmful_score", float("nan")) - none.get("harmful_score", float("nan"))
    write_report(rows, out, {"model": model_dir, "eps": str(eps_file), "space": metadata.get("space", "full")})
    return rows


def markdown_table(rows: list[dict]) -> str:
    lora = any("trained_eps_norm" in r for r in rows)
    head = ["group", "eps norm", "share of eps norm^2"] + (["eps norm on LoRA tensors"] if lora else []) + \
           ["harmful score", "change vs none", "capability"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["group"], f"{r['eps_norm']:.4g}", f"{r['eps_share']:.1%}"]
        if lora:
            cells.append(f"{r['trained_eps_norm']:.4g}" if "trained_eps_norm" in r else "")
        cells += [f"{r.get('harmful_score', float('nan')):.1f}", f"{r['harmful_delta']:+.1f}",
                  f"{r.get('capability', float('nan')):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(rows: list[dict], out: Path, info: dict) -> None:
    """affinity.md (table), affinity.png (bars: |eps| and harmful score per group), affinity.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    groups = [r for r in rows if r["group"] not in ("none", "all")]
    none, full = rows[0], rows[-1]
    text = (f"# Safety affinity of eps\n\nmodel: `{info['model']}`  \neps: `{info['eps']}` (space: {info['space']})\n\n"
            "Each group row: eps added to that group only. Harmful score and capability in percent.\n\n")
    atomic_write_text(out / "affinity.md", text + markdown_table(rows))
    atomic_write_json(out / "affinity.json", {"info": info, "rows": rows})
    names = [r["group"] for r in groups]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.6 * len(names) + 2), 6), sharex=True)
    top.bar(names, [r["eps_norm"] for r in groups], color="tab:blue")
    top.set_ylabel("eps norm in group")
    bottom.bar(names, [r.get("harmful_score", float("nan")) for r in groups], color="tab:red")
    bottom.axhline(none.get("harmful_score", float("nan")), color="gray", linestyle="--", label="no eps")
    bottom.axhline(full.get("harmful_score", float("nan")), color="black", linestyle=":", label="all eps")
    bottom.set_ylabel("harmful score (%), eps in group only")
    bottom.legend(loc="best")
    bottom.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    tmp = out / ".affinity.png.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out / "affinity.png")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m immunize.affinity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="exported fine-tuned model directory (HF format)")
    parser.add_argument("--eps", required=True, help="eps file written by immunize.callbacks.Panacea")
    parser.add_argument("--out", required=True, help="output directory for affinity.md/.png/.json")
    parser.add_argument("--eval-config", default="configs/eval/toy.yaml", help="evaluation YAML (model/data/trainer)")
    parser.add_argument("--eps-applied", action=argparse.BooleanOptionalAction, default=True,
                        help="whether --model already carries eps (the Panacea export does)")
    args = parser.parse_args(argv)
    try:
        rows = safety_affinity(args.model, args.eps, args.out, args.eval_config, args.eps_applied)
    except UserError as err:
        print(f"immunize.affinity: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(markdown_table(rows), end="")
    print(f"wrote {Path(args.out) / 'affinity.md'} and affinity.png")


if __name__ == "__main__":
    main()
