"""A LoRA run's checkpoint holds plain data only: it loads with torch.load(weights_only=True), and `immunize fit
--ckpt_path` resumes it under torch's safe loader (Lightning's default)."""
import torch
import yaml


def test_lora_checkpoint_loads_safely_and_resumes(cli_server, tmp_path):
    cfg = {"model": {"class_path": "immunize.lightning_modules.SFT",
                     "init_args": {"model": "toy:tiny", "lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj"]}}},
           "data": {"class_path": "immunize.datamodules.SFTData",
                    "init_args": {"train": [{"kind": "toy", "part": "benign", "limit": 8}], "batch_size": 4}},
           "trainer": {"max_steps": 2, "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                       "default_root_dir": str(tmp_path / "run")}}
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(cfg))
    first = cli_server.run("fit", "--config", "fit.yaml", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt = next((tmp_path / "run").rglob("*.ckpt"))
    state = torch.load(ckpt, weights_only=True)
    assert state["hyper_parameters"]["lora"] == {"r": 4, "lora_alpha": 8.0, "lora_dropout": 0.0,
                                                 "target_modules": ["q_proj"]}
    resumed = cli_server.run("fit", "--config", "fit.yaml", "--ckpt_path", str(ckpt), "--trainer.max_steps", "3",
                             cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
