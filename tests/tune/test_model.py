"""Device, threads and autocast decisions of `calibserve tune`."""

from __future__ import annotations

import pytest
import torch

from calibserve.tune import model as tune_model
from calibserve.tune.errors import InvalidConfig
from calibserve.tune.model import cpu_threads, resolve_device, use_autocast


@pytest.mark.parametrize(("load", "cores", "threads"), [
    (0.1, 2, 2), (0.6, 2, 1), (1.6, 2, 1), (3.8, 2, 1), (2.2, 8, 6), (0.0, 8, 8), (20.0, 8, 1),
])
def test_threads_default_to_the_free_cores(monkeypatch: pytest.MonkeyPatch, load: float,
                                           cores: int, threads: int) -> None:
    monkeypatch.setattr(tune_model.os, "getloadavg", lambda: (load, load, load))
    assert cpu_threads(None, cores) == threads
    assert cpu_threads(3, cores) == 3  # asked for: as asked


def test_no_load_average_means_every_core(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> tuple[float, float, float]:
        raise OSError("no load average")

    monkeypatch.setattr(tune_model.os, "getloadavg", missing)
    assert cpu_threads(None, 4) == 4


def test_autocast_follows_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert use_autocast("off", cpu) is False
    assert use_autocast("bf16", cpu) is True
    monkeypatch.setattr(tune_model, "native_bf16", lambda device: False)
    assert use_autocast("auto", cpu) is False  # emulated bf16 is slower than float32
    monkeypatch.setattr(tune_model, "native_bf16", lambda device: True)
    assert use_autocast("auto", cpu) is True


def test_devices() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidConfig) as err:
            resolve_device("cuda:0")
        assert err.value.param == "--device"
