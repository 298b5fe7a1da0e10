"""The vocabulary of params: closed sets of choices (devices, dtypes, tasks, modes), the value
constraints of the schema's fields, and the one function that checks them.

    @dataclass
    class SlotStatsParams:
        seq_len: int = positive(128)            # a constraint, declared on the field
        device: Device = Device.auto            # a choice: nothing else merges

    check(params)                               # every constraint of every nested field

Choices are `str` enums: OmegaConf refuses any other value when params.yaml and the overrides are
merged, and a member compares, hashes, formats and JSON-encodes as its plain string
(Device.cpu == "cpu", f"{Device.cpu}" == "cpu"). A constraint is a rule in the dataclass field's
metadata; `check` walks a dataclass instance or an OmegaConf node of one and raises
ValueError("key 'a.b.c': expected ..., got ...") at the first value that breaks one.
slotwise.config.load_params turns that into the one-line ConfigError of a bad params file; the
configs a library user builds in Python (SMFConfig, GritParams, MemoryConfig, MethodRun) call
`check` from __post_init__, which also turns their choice strings into members.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from enum import Enum
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

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


class Dtype(Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class FusedUpdate(Choice):
    """A value pool's backward fused with its sparse update (slotwise.fused_update): the heal's
    train.loop.optim.fused_update and SMF's smf.fused_update."""
    auto = "auto"  # on for pools on CUDA, off on CPU
    on = "on"  # always (on CPU: the kernels' PyTorch reference of the fused op)
    off = "off"  # the pool gets its gradient, then the sparse optimizer steps


class Task(Choice):
    """Evaluation tasks: lm-eval YAML in slotwise/evaluation/lm_eval_tasks/, data from the data stage."""
    nq_open = "nq_open"
    triviaqa = "triviaqa"
    hellaswag = "hellaswag"
    arc_easy = "arc_easy"
    arc_challenge = "arc_challenge"
    piqa = "piqa"
    lambada = "lambada"
    gsm8k = "gsm8k"


TASKS = Task.values()


def choice_error(key: str, choices: tuple[str, ...] | list[str], value: Any, noun: str | None = None) -> str:
    """The one wording of a value outside its choices: a field, or an item of a list of `noun`s."""
    if noun:
        return f"key '{key}': unknown {noun} {str(value)!r} (known {noun}s: {', '.join(choices)})"
    return f"key '{key}': expected one of ({', '.join(choices)}), got {str(value)!r}"


def omegaconf_error(exc: Exception, schema: DictConfig) -> str:
    """One line for an OmegaConf merge error against `schema`: an unknown key (and the known ones
    beside it), a value outside a choice (choice_error's wording), or a wrong type."""
    key = getattr(exc, "full_key", None) or "?"
    msg = str(getattr(exc, "msg", exc)).splitlines()[0]
    if isinstance(exc, ConfigKeyError) or "not in" in msg:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(schema, parent) if parent else schema
        known = ", ".join(sorted(node.keys())) if isinstance(node, DictConfig) else ""
        return f"unknown key '{key}' (expected one of: {known})"
    choices = re.fullmatch(r"Invalid value '.*', expected one of \[(.*)\]", msg)
    if isinstance(exc, ValidationError) and choices:
        items = re.fullmatch(r"(.*)\[\d+\]", key)  # an item of a list of choices
        noun = typing.get_args(getattr(exc, "ref_type", None))[0].__name__.lower() if items else None
        return choice_error(items[1] if items else key, choices[1].split(", "), exc.value, noun)
    return f"key '{key}': {msg}"


def resolve_device(device: str, key: str = "device"):
    """params `device` (auto | cpu | cuda) -> torch.device; `key` names the param in the error."""
    import torch

    if device not in Device.values():
        raise ConfigError(choice_error(key, Device.values(), device))
    if device == Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == Device.cuda and not torch.cuda.is_available():
        raise ConfigError(f"key '{key}': cuda requested but no CUDA device is available")
    return torch.device(str(device))


# --- constraints on fields ------------------------------------------------------------------------

Rule = Callable[[Any, Any], "str | None"]  # (value, the object holding it) -> what was expected, or None


def constrained(default: Any = dataclasses.MISSING, *, rule: Rule, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose (non-null) value `rule` accepts."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"rule": rule})
    return dataclasses.field(default=default, metadata={"rule": rule})


def positive(default: Any = dataclasses.MISSING) -> Any:
    return constrained(default, rule=lambda v, _: None if v >= 1 else "expected a positive integer")


def at_least(low: float, default: Any, what: str) -> Any:
    return constrained(default, rule=lambda v, _: None if v >= low else f"expected {what}")


def between(low: int, high: int, default: Any) -> Any:
    return constrained(default, rule=lambda v, _: None if low <= v <= high else f"expected {low}..{high}")


def even(default: Any) -> Any:
    """A positive even integer."""
    return constrained(default, rule=lambda v, _: "expected a positive integer" if v < 1 else
                       ("expected an even number" if v % 2 else None))


def at_most(other: str, default: Any) -> Any:
    """A positive integer no larger than the field `other` of the same object."""
    return constrained(default, rule=lambda v, o: "expected a positive integer" if v < 1 else
                       (f"must not exceed {other} ({getattr(o, other)})" if v > getattr(o, other) else None))


def number(default: Any, low: float | None = None, high: float | None = None, open_low: bool = False) -> Any:
    """A finite number (NaN and inf refused: an lr of inf trains to NaN, a gate limit of inf passes
    anything) in [low, high], or (low, high] with open_low; either bound may be left out."""
    if low is not None and high is not None:
        what = f"a number in {'(' if open_low else '['}{low:g}, {high:g}]"
    elif low is not None:
        what = f"a finite number {'>' if open_low else '>='} {low:g}"
    else:
        what = "a finite number"

    def rule(v, _):
        ok = math.isfinite(v) and (low is None or (v > low if open_low else v >= low)) and (high is None or v <= high)
        return None if ok else f"expected {what}"
    return constrained(default, rule=rule)


def layer_indices(default_factory: Callable, below: str | None = None) -> Any:
    """A non-empty list of distinct layer indices >= 0 (and < the field `below` of the same object)."""
    def rule(v, o):
        layers = list(v)
        if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
            return f"expected a non-empty list of distinct layer indices >= 0, got {layers}"
        if below is not None and max(layers) >= getattr(o, below):
            n = getattr(o, below)
            return f"expected layer indices in 0..{n - 1} ({below} = {n}), got {layers}"
        return None
    return constrained(rule=rule, default_factory=default_factory)


def block_len(default: Any) -> Any:
    """Tokens per block of a next-token loss: at least two."""
    return at_least(2, default, "an integer >= 2 (a next-token loss needs two tokens)")


def unique(default_factory: Callable, by: str | None = None, what: str = "items must be unique") -> Any:
    """A list whose items (or the items' attribute `by`) do not repeat."""
    def rule(items, _):
        keys = [str(getattr(i, by) if by else i) for i in items]
        return None if len(set(keys)) == len(keys) else f"{what}: {keys}"
    return constrained(rule=rule, default_factory=default_factory)


# --- the check ------------------------------------------------------------------------------------

def _dataclass_of(obj: Any) -> type | None:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return type(obj)
    if isinstance(obj, DictConfig):
        t = OmegaConf.get_type(obj)
        return t if t is not None and dataclasses.is_dataclass(t) else None
    return None


def _choice_of(hint: Any) -> type[Choice] | None:
    for t in (hint, *typing.get_args(hint)):
        if isinstance(t, type) and issubclass(t, Choice):
            return t
    return None


def _as_choice(hint: Any, value: Any, key: str) -> Any:
    """A plain string in a Choice-typed field (or list of them) -> the member; an unknown one -> ValueError."""
    if typing.get_origin(hint) is list and isinstance(value, list):
        choice = _choice_of(typing.get_args(hint)[0]) if typing.get_args(hint) else None
        if choice is None:
            return value
        bad = [v for v in value if v not in choice.values()]
        if bad:
            raise ValueError(choice_error(key, choice.values(), bad[0], choice.__name__.lower()))
        return [choice(v) for v in value]
    choice = _choice_of(hint)
    if choice is None or value is None or isinstance(value, choice):
        return value
    if value not in choice.values():
        raise ValueError(choice_error(key, choice.values(), value))
    return choice(value)


def check(obj: Any, prefix: str = "") -> None:
    """Every choice and constraint of obj and of the dataclasses nested in it (a dataclass instance,
    or an OmegaConf node of one); raises ValueError("key '<prefix>.<field>': ...") at the first break."""
    cls = _dataclass_of(obj)
    if cls is None:
        return
    hints = typing.get_type_hints(cls)
    instance = not isinstance(obj, DictConfig)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(obj, f.name)
        if instance:  # OmegaConf nodes have their choices checked by OmegaConf itself
            value = _as_choice(hints[f.name], value, key)
            setattr(obj, f.name, value)
        rule = f.metadata.get("rule")
        why = rule(value, obj) if rule is not None and value is not None else None
        is_list = isinstance(value, (list, tuple, ListConfig))
        if why is not None and is_list:
            raise ValueError(f"key '{key}': {why}")
        if why is not None:
            or_null = " or null" if type(None) in typing.get_args(hints[f.name]) and why.startswith("expected") else ""
            raise ValueError(f"key '{key}': {why}{or_null}, got {value}")
        if is_list:
            for i, item in enumerate(value):
                check(item, f"{key}[{i}]")
        else:
            check(value, key)
