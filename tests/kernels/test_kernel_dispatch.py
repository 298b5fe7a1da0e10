"""Backend selection: auto picks the reference on CPU; forcing Triton on CPU needs the interpreter."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from _kernel_fixtures import device  # noqa: F401  (pytest fixture)

from slotwise.kernels import weighted_bag
from slotwise.kernels._dispatch import resolve_backend


def test_auto_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("SLOTWISE_KERNELS", raising=False)
    assert resolve_backend("auto", torch.zeros(1)) == "torch"
    assert resolve_backend("torch", torch.zeros(1)) == "torch"


def test_env_sets_the_default(monkeypatch):
    monkeypatch.setenv("SLOTWISE_KERNELS", "torch")
    assert resolve_backend("auto", torch.zeros(1)) == "torch"


def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    values, ids, w = torch.randn(5, 3), torch.zeros(2, 1, 2, dtype=torch.int64), torch.ones(2, 1, 2)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        weighted_bag(values, ids, w, backend="triton")


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", torch.zeros(1))


def test_importing_kernels_does_not_import_triton():
    """Triton loads lazily, so importing slotwise never fixes the interpreter choice too early."""
    code = "import sys, slotwise.kernels; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_ops_survive_importing_every_kernel_module(device):
    """A submodule named like an op would replace the op on the package once imported
    (kernels.weighted_bag the module instead of the function): every public name stays callable."""
    import importlib
    import pkgutil

    from slotwise import kernels

    for mod in pkgutil.iter_modules(kernels.__path__):
        if mod.name not in ("bench", "compile_check"):
            importlib.import_module(f"slotwise.kernels.{mod.name}")
    for name in kernels.__all__:
        assert callable(getattr(kernels, name)), f"slotwise.kernels.{name} is a {type(getattr(kernels, name))}"
