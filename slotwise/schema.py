"""The vocabulary of params: closed sets of choices (devices, dtypes, tasks, modes).

Choices are `str` enums: OmegaConf refuses any other value when params.yaml and the overrides are
merged, and a member compares, hashes, formats and JSON-encodes as its plain string
(Device.cpu == "cpu", f"{Device.cpu}" == "cpu").
"""
from __future__ import annotations

from enum import Enum

from slotwise.errors import ConfigError


class Choice(str, Enum):
    """A closed set of strings whose members behave as the strings themselves."""

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class Device(Choice):
    auto = "auto"  # cuda when available, else cpu
    cpu = "cpu"
    cuda = "cuda"


def resolve_device(device: str, key: str = "device"):
    """params `device` (auto | cpu | cuda) -> torch.device; `key` names the param in the error."""
    import torch

    if device == Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in Device.values():
        raise ConfigError(f"key '{key}': expected one of {Device.values()}, got {device!r}")
    if device == Device.cuda and not torch.cuda.is_available():
        raise ConfigError(f"key '{key}': cuda requested but no CUDA device is available")
    return torch.device(str(device))
