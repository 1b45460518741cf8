"""DDP helpers of the multi-pass methods: the mean all-reduce across two gloo ranks."""

from __future__ import annotations






_WORKER = """
import importlib.util, sys, torch, torch.distributed as dist
spec = importlib.util.spec_from_file_location("grad_math", sys.argv[3])  # skip the heavy package __init__
gm = importlib.util.module_from_spec(spec); spec.loader.exec_module(gm)
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
ts = [torch.full((3,), float(rank)), torch.full((2, 2), 10.0 * rank)]
gm.all_reduce_mean_(ts)
assert torch.equal(ts[0], torch.full((3,), 0.5)) and torch.equal(ts[1], torch.full((2, 2), 5.0)), ts
dist.destroy_process_group()
"""


def test_all_reduce_mean_across_two_gloo_ranks(tmp_path):
    import os
    import subprocess
    import sys

    import immunize.lightning_modules.functional.grad_math as gm

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(rank), str(tmp_path / "store"), gm.__file__],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
