"""tilemoe.bench.report's GPU state line (the header's "gpu state"), without a GPU: nvidia-smi and the device's
properties stood in for."""

import subprocess
from types import SimpleNamespace

import pytest
import torch

from tilemoe.bench import report


def _smi(stdout: str, calls: list):
    def run(argv, **kwargs):
        calls.append(argv)
        return SimpleNamespace(stdout=stdout, returncode=0)

    return run


@pytest.fixture
def cuda_props(monkeypatch):
    props = SimpleNamespace(uuid="5f6a2e1c-0000-4000-8000-00000000abcd")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    return props


def test_gpu_state_reads_nvidia_smi_for_this_gpu_by_uuid(cuda_props):
    calls = []
    line = report.gpu_state(torch.device("cuda", 0), run=_smi("700.00, 1980, 1755, 33, 71.23\n", calls))
    assert line == "power limit 700 W, SM clock 1980 MHz max / 1755 now, 33 C, 71 W"
    (argv,) = calls
    assert argv[0] == "nvidia-smi" and argv[-2:] == ["-i", "GPU-5f6a2e1c-0000-4000-8000-00000000abcd"]
    assert f"--query-gpu={report.GPU_STATE_QUERY}" in argv
    cuda_props.uuid = "GPU-1234"  # already in nvidia-smi's form: not prefixed twice
    report.gpu_state(torch.device("cuda", 0), run=_smi("700, 1980, 1755, 33, 71", calls))
    assert calls[-1][-1] == "GPU-1234"


def test_gpu_state_is_none_where_it_cannot_be_read(cuda_props):
    cuda = torch.device("cuda", 0)
    assert report.gpu_state(torch.device("cpu")) is None

    def missing(argv, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    def failing(argv, **kwargs):
        raise subprocess.CalledProcessError(6, argv)

    assert report.gpu_state(cuda, run=missing) is None
    assert report.gpu_state(cuda, run=failing) is None
    assert report.gpu_state(cuda, run=_smi("[N/A], 1980, 1755, 33, 71", [])) is None  # a field it cannot read
    assert report.gpu_state(cuda, run=_smi("700, 1980", [])) is None  # fewer fields than asked
    cuda_props.uuid = None
    assert report.gpu_state(cuda, run=_smi("700, 1980, 1755, 33, 71", [])) is None  # no UUID: no GPU named wrongly


def test_environment_has_no_gpu_state_on_the_cpu():
    assert "gpu state" not in report.environment(torch.device("cpu"))


@pytest.mark.gpu
def test_gpu_state_on_the_gpu():
    """On a GPU with nvidia-smi, the line is read (the UUID's form is what nvidia-smi takes)."""
    import re

    line = report.gpu_state(torch.device("cuda", torch.cuda.current_device()))
    assert line is not None and re.fullmatch(r"power limit \d+ W, SM clock \d+ MHz max / \d+ now, \d+ C, \d+ W", line)
    assert "gpu state" in report.environment(torch.device("cuda"))  # (its clocks and draw change between reads)
