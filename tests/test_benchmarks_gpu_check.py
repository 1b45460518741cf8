"""benchmarks/gpu_check.py runs its whole code path on a CPU (the GPU machine gets one try): step times over SFT's,
memory against memory.py's prediction, the FSDP2 line, generation throughput."""
import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_cpu_and_its_prediction_matches_the_measured_peak():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--shape",
                          "llama-tiny", "--batch", "2", "--length", "32", "--steps", "1", "--methods", "seam",
                          "--gen_batch", "2", "--gen_tokens", "4", "--json"],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["device"] == "cpu" and result["sft_mfu"] is None  # no bf16 peak for a CPU
    sft, seam = result["methods"]["sft"], result["methods"]["seam"]
    assert sft["over_sft_time"] == 1.0 and seam["over_sft_time"] > 1.5  # SEAM's step is several passes
    for row in (sft, seam):
        assert 0.8 < row["predicted_over_measured"] < 1.25  # memory.py's arithmetic against the profiler
    assert result["generation"]["new_tokens"] == 2 * 4 and result["generation"]["tokens_per_second"] > 0
    assert "not_measured" in result["fsdp2"]
