"""Shared pytest fixtures: where the real annotation fixtures live, offline hubs, small CPU thread count."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """The real annotation files in ../shared/fixtures (beside the clone); skip when absent."""
    for candidate in (REPO.parent / "shared" / "fixtures", REPO / "shared" / "fixtures"):
        if candidate.is_dir():
            return candidate
    pytest.skip("../shared/fixtures not found beside the repository")


@pytest.fixture(scope="session")
def parity_fixture(shared_fixtures):
    """``parity_fixture(name)``: the folder ``../shared/fixtures/parity/<name>`` (official outputs on stand-in
    weights); the test is skipped when it is absent."""

    def folder(name: str) -> Path:
        path = shared_fixtures / "parity" / name
        if not (path / "expected.npz").is_file():
            pytest.skip(f"{path} not found")
        return path

    return folder


@pytest.fixture(scope="session")
def parity_recipe(shared_fixtures):
    """The parity fixtures' ``recipe.py`` module: deterministic stand-in weights from names and shapes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("parity_recipe", shared_fixtures / "parity" / "recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    try:
        import torch
    except ImportError:
        yield
        return
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models: on a shared 2-core machine one thread is several times faster than two.
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def isolated_env(tmp_path, monkeypatch):
    """Point data root, cache and weights dirs into tmp_path so tests never touch the user's files."""
    monkeypatch.setenv("WSOLBENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("WSOLBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WSOLBENCH_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("WSOLBENCH_CONFIG", str(tmp_path / "config.yaml"))
    return tmp_path
