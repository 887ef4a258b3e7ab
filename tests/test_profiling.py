"""wsolbench.profiling: parameter counts and latency measured the same way for every method."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from wsolbench.localizer import Capability, Localizer, LocalizerOutput
from wsolbench.profiling import count_parameters, format_profile, profile_method


class _Toy(Localizer):
    """A method holding an inference net, a shared layer and a training-only module."""

    capabilities = frozenset({Capability.SINGLE})

    def __init__(self, **kw):
        super().__init__(**kw)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 1, 1))  # 112 + 5 = 117
        self.alias = self.net[0]  # the same parameters again: counted once
        self.teacher = nn.Linear(10, 10)  # 110, used only for training
        self.calls = []

    def inference_modules(self):
        return [self.net]

    def localize(self, images, classes=None, texts=None):
        self.calls.append((classes, texts))
        x = self.preprocess(images, size=32)
        return LocalizerOutput(maps=self.net(x))


class _PhraseOnly(_Toy):
    capabilities = frozenset({Capability.PHRASE})


def test_counts_latency_and_defaults():
    m = _Toy()
    r = profile_method(m, input_size=32, n_images=3, device="cpu", warmup=1)
    assert r["params_inference"] == 117
    assert r["params_total"] == 117 + 110
    assert r["ms_per_image"] > 0 and r["ms_per_image_median"] > 0 and r["peak_mem"] is None
    assert r["n_images"] == 3 and r["batch_size"] == 1 and r["device"] == "cpu"
    assert len(m.calls) == 4 and m.calls[0] == (None, None)  # warm-up + timed, no labels given
    assert "0.00M params at inference" in format_profile(r)


def test_phrase_only_methods_get_a_text_query_and_kwargs_override():
    m = _PhraseOnly()
    profile_method(m, input_size=16, n_images=1, device="cpu", warmup=0)
    assert m.calls == [(None, [["object"]])]
    m2 = _Toy()
    profile_method(m2, input_size=16, n_images=1, device="cpu", warmup=0, localize_kwargs={"classes": [3]})
    assert m2.calls == [([3], None)]


def test_count_parameters_dedups_shared_tensors():
    lin = nn.Linear(3, 2)
    assert count_parameters([lin, lin, nn.Sequential(lin)]) == 8


def test_methods_without_modules_and_bad_args():
    from wsolbench.methods.baselines.method import CenterPrior

    r = profile_method(CenterPrior(), input_size=32, n_images=2, device="cpu", warmup=0)
    assert r["params_total"] == 0 and r["params_inference"] == 0 and r["method"] == "center"
    with pytest.raises(ValueError):
        profile_method(CenterPrior(), n_images=0, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            profile_method(_Toy(), n_images=1, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_memory():
    class _Cuda(_Toy):
        def to(self, device):
            self.device = str(device)
            self.net.to(device)
            return self

    r = profile_method(_Cuda(), input_size=64, n_images=3, device="cuda", warmup=1)
    assert r["peak_mem"] is not None and r["peak_mem"] > 0 and r["device_name"] != "cpu"


def test_cli_profile_takes_config_overrides(capsys):
    from wsolbench.cli import main

    assert main(["profile", "--method", "center", "--profile", "tiny", "--set", "sigma=0.3", "--n", "1",
                 "--num-classes", "2", "--input-size", "32"]) == 0
    assert "ms_per_image:" in capsys.readouterr().out
    assert main(["profile", "--method", "center", "--profile", "tiny", "--set", "sigmaa=0.3", "--n", "1"]) == 3
    assert "unknown key 'sigmaa'" in capsys.readouterr().err
