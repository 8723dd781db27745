"""The numerical tests again, with other CPU kernels selected.

ATen and oneDNN pick their kernels (vector width, blocking, reduction order) by the CPU they
run on, so a tolerance read off one machine can pass here and fail on another vendor's CPU.
Running the model, recipe and metric unit tests with the kernels forced down to other
instruction sets shows such a tolerance on this machine, in this suite (and so in CI). Each
configuration runs in its own process; the two run side by side, one thread each.
"""
from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import PYTHON, REPO

pytestmark = pytest.mark.integration

# The unit tests whose references come from other precisions, kernels or reduction orders.
NUMERICAL_TESTS = ["tests/models", "tests/recipes", "tests/dist_train/test_trainer_parts.py",
                   "tests/dist_train/test_fp16_schedule.py"]

KERNELS = {
    # no ATen vectorisation at all; oneDNN limited to SSE4.1
    "scalar-sse41": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    # 256-bit kernels, as on CPUs without AVX-512 (the usual kernels on those that have it)
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def test_numerical_tests_pass_with_other_kernels(tmp_path):
    procs = {}
    for name, kernel_env in KERNELS.items():
        env = {**os.environ, **kernel_env, "OMP_NUM_THREADS": "1"}
        log = open(tmp_path / f"{name}.log", "w+")
        cmd = [PYTHON, "-m", "pytest", "-q", "-m", "not integration", "-p", "no:cacheprovider",
               "--basetemp", str(tmp_path / name), *NUMERICAL_TESTS]
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    failed = {}
    for name, (proc, log) in procs.items():
        rc = proc.wait(timeout=600)
        log.seek(0)
        out = log.read()
        log.close()
        assert " passed" in out, f"{name}: no test ran:\n{out[-2000:]}"
        if rc != 0:
            failed[name] = "\n".join(line for line in out.splitlines()
                                     if line.startswith(("FAILED", "ERROR", "E  ")))[-3000:]
    assert not failed, "numerical tests fail with other kernels:\n" + "\n".join(
        f"[{name}: {' '.join(f'{k}={v}' for k, v in KERNELS[name].items())}]\n{lines}" for name, lines in failed.items())
