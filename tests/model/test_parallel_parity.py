"""Tensor- and expert-parallel forward/backward of the model == the single-process model (2 ranks, gloo).

The parallel plans live in ``r1zero/train`` (pretrain engineer); this checks that the model's
attention (local heads), shared-expert SwiGLU and ``MoELayer.ep_dispatch`` hook stay exact
under them, to 1e-5 in fp32.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("parallel_worker.py")
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("par")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), "2", str(port), str(tmp / f"r{r}.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    return [json.loads((tmp / f"r{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_tensor_parallel_matches_single_process(results):
    for res in results:
        assert res["tp_sharded_params"] > 0
        assert res["tp_logits"] < 1e-5 and res["tp_loss"] < 1e-5
        assert res["tp_grads"] < 1e-5, res


@pytest.mark.slow
def test_expert_parallel_matches_single_process(results):
    for res in results:
        assert res["ep_owned_params"] == 2 * 2 * 2  # 2 MoE layers x 2 local experts x (gate_up, down)
        assert res["ep_logits"] < 1e-5 and res["ep_loss"] < 1e-5
        assert res["ep_expert_grads"] < 1e-5 and res["ep_dense_grads"] < 1e-5, res
