"""Device choices that a CPU can check: decode batch sizing and the GPU check's refusal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from terrasam.models import device as device_mod

ROOT = Path(__file__).resolve().parents[1]


def test_decode_batch_off_cuda_is_at_most_16():
    assert device_mod.decode_batch_for(torch.device("cpu"), 64) == 16
    assert device_mod.decode_batch_for(torch.device("cpu"), 8) == 8


def test_decode_batch_on_cuda_follows_free_memory(monkeypatch):
    free = {"bytes": 8 * 2**30}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 2**36))
    cuda = torch.device("cuda")
    # half of 8 GiB free at 16 MiB a prompt
    assert device_mod.decode_batch_for(cuda, 64) == 256
    free["bytes"] = 80 * 2**30
    assert device_mod.decode_batch_for(cuda, 64) == 1024  # the ceiling
    free["bytes"] = 2**20
    assert device_mod.decode_batch_for(cuda, 64) == 16  # the floor
    assert device_mod.decode_batch_for(cuda, 8) == 8


def test_gpu_check_ends_in_one_line_without_cuda():
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"gpu_check: PyTorch {torch.__version__} sees no CUDA GPU here; run this on a CUDA "
        "machine"]


def test_mmap_threshold_is_fixed_once_on_glibc():
    import platform

    from terrasam import malloc

    if not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"):
        assert malloc.fix_mmap_threshold() is False
        return
    assert malloc.fix_mmap_threshold() is True
    assert malloc.fix_mmap_threshold() is True  # idempotent
