import subprocess
import sys
from pathlib import Path

import pytest

from slotwise.config import ConfigError, load_params

ROOT = Path(__file__).resolve().parents[1]


def test_repository_params_file_is_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.retrofit.insert.layers == [8, 15, 22]


def test_overrides_are_typed():
    p = load_params(ROOT / "params.yaml", ["retrofit.insert.memory.n_keys=64", "retrofit.insert.layers=[2,4]"])
    assert p.retrofit.insert.memory.n_keys == 64 and p.retrofit.insert.layers == [2, 4]


@pytest.mark.parametrize(
    "yaml_text,match",
    [
        ("retrofit:\n  insert:\n    memory:\n      n_keyz: 64\n", r"unknown key 'retrofit.insert.memory.n_keyz' \(expected one of: .*n_keys"),
        ("retrofit:\n  insert:\n    memory:\n      knn: sixteen\n", r"key 'retrofit.insert.memory.knn': Value 'sixteen'.*Integer"),
        ("retrofit:\n  dtype: float8\n", r"key 'retrofit.dtype': expected one of"),
        ("retrofit:\n  insert:\n    memory:\n      k_dim: 15\n", r"key 'retrofit.insert.memory.k_dim': expected an even"),
        ("retrofit: [1, 2\n", r"not valid YAML"),
    ],
)
def test_bad_params_give_one_line_naming_the_key(tmp_path, yaml_text, match):
    path = tmp_path / "params.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=match) as info:
        load_params(path)
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "slotwise.components.retrofit", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "yaml_text,args,match",
    [
        ("retrofit:\n  insert:\n    layerz: [1]\n", [], "unknown key 'retrofit.insert.layerz'"),
        ("retrofit:\n  insert:\n    alpha: high\n", [], "key 'retrofit.insert.alpha': Value 'high'"),
        (None, ["--params", "nowhere.yaml"], "params file not found: nowhere.yaml"),
        ("retrofit:\n  base_model: /no/such/model.gguf\n", [], "GGUF file not found: /no/such/model.gguf"),
        ("retrofit:\n  base_model: ./no_such_dir\n", [], "not a model directory"),
    ],
)
def test_cli_exits_2_with_one_line(tmp_path, yaml_text, args, match):
    if yaml_text is not None:
        (tmp_path / "params.yaml").write_text(yaml_text)
    res = _cli(*args, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and match in lines[0], res.stderr
    assert not (tmp_path / "out").exists()


def test_cli_override_typo_exits_2(tmp_path):
    (tmp_path / "params.yaml").write_text("retrofit: {}\n")
    res = _cli("--out", str(tmp_path / "out"), "retrofit.insert.memory.nkeys=3", cwd=tmp_path)
    assert res.returncode == 2
    assert "unknown key 'retrofit.insert.memory.nkeys'" in res.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "profiles").glob("*.yaml")), ids=lambda p: p.name)
def test_every_params_profile_is_valid(path):
    params = load_params(path)
    assert params.retrofit.insert.memory.n_keys > 0


def test_values_from_the_environment_are_not_written_in_clear(tmp_path, monkeypatch):
    """${oc.env:...} (and what interpolates it) is used resolved but written back as the expression."""
    from slotwise.config import to_yaml, write_resolved

    secret = "wJalrXUtnFEMI-K7MDENG-test-secret"
    monkeypatch.setenv("SLOTWISE_TEST_SECRET", secret)
    (tmp_path / "p.yaml").write_text('retrofit: {check_prompt: "${oc.env:SLOTWISE_TEST_SECRET}"}\n'
                                     'data: {local_dir: "/mnt/${oc.env:SLOTWISE_TEST_SECRET}"}\n')
    p = load_params(tmp_path / "p.yaml", ["evaluate.device=${oc.env:SLOTWISE_TEST_DEVICE,cpu}"])
    assert p.retrofit.check_prompt == secret and p.train.sft_data == f"/mnt/{secret}/sft/gsm8k.train.jsonl"
    assert p.evaluate.device == "cpu"
    text = write_resolved(p, tmp_path / "out").read_text()
    assert secret not in text and secret not in to_yaml(p)
    assert "check_prompt: ${oc.env:SLOTWISE_TEST_SECRET}" in text and "sft_data: ${data.local_dir}/sft/gsm8k.train.jsonl" in text
    again = load_params(tmp_path / "out" / "params.resolved.yaml")  # the written file resolves to the same params
    assert again.retrofit.check_prompt == secret and again.train.sft_data == p.train.sft_data


def test_an_override_that_is_not_yaml_is_one_line():
    with pytest.raises(ConfigError, match=r"override 'train.seq_len=\[1': the value is not valid YAML"):
        load_params(ROOT / "params.yaml", ["train.seq_len=[1"])
