"""Every stage's command line against every malformed input: exit 2, one line on stderr naming what
is wrong, no traceback, no output written, every input unchanged (by hash).

The table is CASES x STAGES (a case applies to the stages that take the input it breaks). Stages run
in this process through run_cli (the CLI's own error handling); a few cases that need a real
process (a file size limit, an unwritable folder) run `python -m slotwise.components.<stage>`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from slotwise.components import continual, data, evaluate, gate, retrofit, slot_stats, train, update
from slotwise.components._cli import run_cli
from test_update import HELDOUT, PARAMS, QA, facts, jsonl, make_world

REPO = Path(__file__).resolve().parents[1]
MAINS = {"data": data.main, "retrofit": retrofit.main, "train": train.main, "slot_stats": slot_stats.main,
         "continual": continual.main, "evaluate": evaluate.main, "update": update.main, "gate": gate.main}
STAGES = tuple(MAINS)
WORLD_PARAMS = PARAMS + """
train: {device: cpu, seq_len: 16, batch_size: 2, eval_batches: 1, report_batches: 1, loop: {max_steps: 2, eval_every: 1, save_every: 1}}
slot_stats: {device: cpu, seq_len: 16, batch_size: 2}
continual: {device: cpu, n_facts: 2, known_screen: 2, ppl_blocks: 2, ppl_seq_len: 16, methods: [{name: smf, method: smf, params: {score: tf, top_t: 4}}]}
evaluate: {device: cpu, tasks: [], perplexity: {seq_len: 16, max_blocks: 2}, facts: {limit: 2}}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory, smol_tokenizer):
    """make_world (model, stats, data, drop) + what the other stages read, and a candidate delta for gate."""
    w = make_world(tmp_path_factory.mktemp("bad_inputs"), smol_tokenizer)
    w["params"].write_text(WORLD_PARAMS)
    for split in ("train", "stats"):
        jsonl(w["data"] / f"background/{split}.jsonl", [{"text": t} for t in HELDOUT * 4])
    jsonl(w["data"] / "facts.jsonl", facts(QA, "stream"))
    w["candidate"] = w["root"] / "candidate"
    assert update.main(["--params", str(w["params"]), "--model", str(w["model"]), "--stats", str(w["stats"]),
                        "--facts", str(w["drop"]), "--out", str(w["candidate"])]) == 0
    return w


def stage_args(stage: str, w: dict, out: Path) -> list[str]:
    """Arguments that run `stage` on the world, writing `out`."""
    m, d, s, p = (str(w[k]) for k in ("model", "data", "stats", "params"))
    return {"data": ["--params", p, "--out", str(out)],
            "retrofit": ["--params", p, "--out", str(out)],
            "train": ["--params", p, "--model", m, "--data", d, "--out", str(out), "--state", str(out) + "_state"],
            "slot_stats": ["--params", p, "--model", m, "--data", d, "--out", str(out)],
            "continual": ["--params", p, "--model", m, "--data", d, "--stats", s, "--out", str(out)],
            "evaluate": ["--params", p, "--model", m, "--data", d, "--out", str(out)],
            "update": ["--params", p, "--model", m, "--stats", s, "--facts", str(w["drop"]), "--out", str(out)],
            "gate": ["--params", p, "--model", m, "--candidate", str(w["candidate"]), "--data", d, "--facts", str(w["drop"]),
                     "--out", str(out)]}[stage]


def replace_arg(args: list[str], flag: str, value) -> list[str] | None:
    """args with flag's value replaced."""
    i = args.index(flag)
    return args[:i + 1] + [str(value)] + args[i + 2:]


def tree_hash(path: Path) -> str:
    """sha256 over every entry's kind, name and (regular files) bytes; links and FIFOs are not followed."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        mode = p.lstat().st_mode
        kind = "L" if stat.S_ISLNK(mode) else "D" if stat.S_ISDIR(mode) else "F" if stat.S_ISREG(mode) else "O"
        h.update(f"{kind}:{p.relative_to(path)}\0".encode())
        if kind == "F":
            h.update(p.read_bytes())
    return h.hexdigest()


FLAGS = {"data": "--params --out", "retrofit": "--params --out", "train": "--params --model --data --out --state",
         "slot_stats": "--params --model --data --out", "continual": "--params --model --data --stats --out",
         "evaluate": "--params --model --data --out", "update": "--params --model --stats --facts --out",
         "gate": "--params --model --candidate --data --facts --out"}


@dataclass
class Case:
    name: str
    expect: str  # a piece of the one-line message
    build: Callable  # (world, scratch dir, stage, args, out) -> the stage's arguments with this input broken
    needs: str = "--params"  # the flag whose input it breaks: the case applies to the stages that take it
    stages: tuple[str, ...] | None = None  # or exactly these stages


def _out_is(flag):
    return lambda w, tmp, stage, args, out: replace_arg(args, "--out", w[flag])


def _foreign_folder(w, tmp, stage, args, out):
    folder = tmp / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("keep me")
    return replace_arg(args, "--out", folder)


def _existing_file(w, tmp, stage, args, out):
    (tmp / "report.pdf").write_bytes(b"%PDF-1.4 keep me")
    return replace_arg(args, "--out", tmp / "report.pdf")


def _params(text: bytes):
    def build(w, tmp, stage, args, out):
        (tmp / "params.yaml").write_bytes(text)
        return replace_arg(args, "--params", tmp / "params.yaml")
    return build


def _override(*items: str):
    return lambda w, tmp, stage, args, out: args + list(items)


def _checkpoint(change: Callable[[Path], None], rehash: bool = False):
    """--model replaced by a copy of the world's checkpoint with change(copy) applied (rehash: the
    manifest updated to match, so the change itself is what the stage meets)."""
    def build(w, tmp, stage, args, out):
        ckpt = tmp / "model"
        shutil.copytree(w["model"], ckpt)
        change(ckpt)
        if rehash:
            manifest = json.loads((ckpt / "manifest.json").read_text())
            manifest = {n: hashlib.sha256((ckpt / n).read_bytes()).hexdigest() for n in manifest}
            (ckpt / "manifest.json").write_text(json.dumps(manifest))
        return replace_arg(args, "--model", ckpt)
    return build


CHECKPOINT_STAGES = ("train", "slot_stats", "continual", "evaluate", "update", "gate")
FACT_STAGES = ("update", "gate", "continual", "evaluate")  # --facts, or facts.jsonl in --data
GOOD_FACT = facts(QA[:1], "bad")[0]


def _facts_file(make: Callable[[Path], None]):
    """The facts input (--facts, else --data's facts.jsonl) replaced by what make(path) creates."""
    def build(w, tmp, stage, args, out):
        if "--facts" in args:
            make(tmp / "new.jsonl")
            return replace_arg(args, "--facts", tmp / "new.jsonl")
        shutil.copytree(w["data"], tmp / "data")
        (tmp / "data" / "facts.jsonl").unlink()
        make(tmp / "data" / "facts.jsonl")
        return replace_arg(args, "--data", tmp / "data")
    return build


def _fact_bytes(body: bytes):
    return _facts_file(lambda p: p.write_bytes(body))


def _fact_with(**fields):
    return _fact_bytes(json.dumps({**GOOD_FACT, **fields}).encode() + b"\n")


CASES = [
    Case("out is --params", "is the input --params", _out_is("params")),
    Case("out is --model", "is the input --model", _out_is("model"), "--model"),
    Case("out is --data", "is the input --data", _out_is("data"), "--data"),
    Case("out is --stats", "is the input --stats", _out_is("stats"), "--stats"),
    Case("out is --candidate", "is the input --candidate", _out_is("candidate"), "--candidate"),
    Case("out contains the inputs", "contains the input", lambda w, tmp, stage, args, out: replace_arg(args, "--out", w["root"])),
    Case("out inside --model", "lies inside the input --model",
         lambda w, tmp, stage, args, out: replace_arg(args, "--out", w["model"] / "sub"), "--model"),
    Case("out is an existing file", "exists and is not a directory", _existing_file),
    Case("out is a foreign folder", "not an earlier output", _foreign_folder),
    Case("params: a single value", "the top level is a single value", _params(b"hello\n")),
    Case("params: a list", "the top level is a list", _params(b"- train\n- data\n")),
    Case("params: not UTF-8", "not UTF-8 text", _params(b"train: {device: \xff}\n")),
    Case("params: not YAML", "not valid YAML", _params(b"train: {seq_len: 64\n")),
    Case("override: not YAML", "the value is not valid YAML", lambda w, tmp, stage, args, out: args + ["train.seq_len=[1"]),
    Case("override: unknown key", "unknown key 'train.seq_lenn'", lambda w, tmp, stage, args, out: args + ["train.seq_lenn=3"]),
    Case("params: empty", "empty (expected the stage sections", _params(b"# nothing here\n")),
    Case("params: memory layers []", "key 'retrofit.insert.layers': expected a non-empty list", _override("retrofit.insert.layers=[]")),
    Case("params: memory layers [1, 1]", "key 'retrofit.insert.layers'", _override("retrofit.insert.layers=[1,1]")),
    Case("params: memory layers [-1]", "key 'retrofit.insert.layers'", _override("retrofit.insert.layers=[-1]")),
    Case("params: lr nan", "key 'train.loop.optim.lr_values': expected a finite number > 0, got nan", _override("train.loop.optim.lr_values=nan")),
    Case("params: lr inf", "key 'train.loop.optim.lr_memory': expected a finite number > 0, got inf", _override("train.loop.optim.lr_memory=inf")),
    Case("params: save_every 0", "key 'train.loop.save_every': expected a positive integer, got 0", _override("train.loop.save_every=0")),
    Case("params: seq_len 0", "key 'train.seq_len': expected an integer >= 2", _override("train.seq_len=0")),
    Case("params: batch_size -1", "key 'train.batch_size': expected a positive integer, got -1", _override("train.batch_size=-1")),
    Case("params: nightly.smf.lr nan", "key 'nightly.smf.lr': expected a finite number > 0, got nan", _override("nightly.smf.lr=nan")),
    Case("params: nightly.smf.lr inf", "key 'nightly.smf.lr'", _override("nightly.smf.lr=inf")),
    Case("params: nightly.smf.lr -1", "key 'nightly.smf.lr': expected a finite number > 0, got -1.0", _override("nightly.smf.lr=-1")),
    Case("params: max_retention_drop inf", "key 'nightly.max_retention_drop': expected a finite number >= 0, got inf",
         _override("nightly.max_retention_drop=inf")),
    Case("params: nightly.eval.ppl_blocks 0", "key 'nightly.eval.ppl_blocks': expected a positive integer, got 0",
         _override("nightly.eval.ppl_blocks=0")),
    Case("train: the loss diverges", "loss became", _override("train.loop.optim.lr_values=1e30", "train.loop.optim.lr_memory=1e30",
                                                              "train.loop.save_every=100"), stages=("train",)),
    Case("checkpoint: no manifest", "no manifest.json", _checkpoint(lambda c: (c / "manifest.json").unlink()), stages=CHECKPOINT_STAGES),
    Case("checkpoint: malformed manifest", "not a valid checkpoint manifest",
         _checkpoint(lambda c: (c / "manifest.json").write_text('{"model.safetensors": ')), stages=CHECKPOINT_STAGES),
    Case("checkpoint: manifest not a mapping", "not a valid checkpoint manifest",
         _checkpoint(lambda c: (c / "manifest.json").write_text("[1, 2]")), stages=CHECKPOINT_STAGES),
    Case("checkpoint: malformed config.json", "config.json: not a usable model config",
         _checkpoint(lambda c: (c / "config.json").write_text("{not json"), rehash=True), stages=CHECKPOINT_STAGES),
    Case("checkpoint: config.json of an unknown model type", "config.json: not a usable model config",
         _checkpoint(lambda c: (c / "config.json").write_text('{"model_type": "no-such-model"}'), rehash=True), stages=CHECKPOINT_STAGES),
    Case("checkpoint: truncated weights", "sha256 does not match",
         _checkpoint(lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:1000])),
         stages=CHECKPOINT_STAGES),
    Case("facts: malformed JSON", "not valid JSON", _fact_bytes(b'{"id": "x", "answers": [\n'), stages=FACT_STAGES),
    Case("facts: not UTF-8", "not UTF-8 text", _fact_bytes(b'{"id": "caf\xe9"}\n'), stages=FACT_STAGES),
    Case("facts: a JSON list, not an object", "expected a JSON object", _fact_bytes(b"[1, 2]\n"), stages=FACT_STAGES),
    Case("facts: probe null", "field 'probe' must be a non-empty string (got null)", _fact_with(probe=None), stages=FACT_STAGES),
    Case("facts: statement null", "field 'statement'", _fact_with(statement=None), stages=("update", "gate", "continual")),
    Case("facts: answers [123]", "field 'answers' must be a non-empty list of non-empty strings (got a list holding int)",
         _fact_with(answers=[123]), stages=FACT_STAGES),
    Case("facts: answers ['']", "(got a list holding empty string)", _fact_with(answers=[""]), stages=FACT_STAGES),
    Case("facts: paraphrases not strings", "field 'paraphrases'", _fact_with(paraphrases=["fine", 7, None]),
         stages=("update", "gate", "continual")),
    Case("facts: answer in no text", "occurs in none of the 'paraphrases'", _fact_with(answers=["Zyzzyva"]),
         stages=("update", "gate", "continual")),
    Case("facts: a FIFO", "a FIFO (expected a regular file)", _facts_file(os.mkfifo), stages=FACT_STAGES),
    Case("facts: a folder named facts.jsonl", "a directory (expected a regular file)", _facts_file(Path.mkdir), stages=("continual", "evaluate")),
]


def _table():
    return [pytest.param(case, stage, id=f"{stage}: {case.name}") for case in CASES for stage in STAGES
            if (stage in case.stages if case.stages else case.needs in FLAGS[stage].split())]


@pytest.mark.parametrize("case,stage", _table())
def test_bad_input_is_one_line_and_exit_2(case, stage, world, tmp_path, capsys):
    out = tmp_path / "out"
    args = case.build(world, tmp_path, stage, stage_args(stage, world, out), out)
    before_world, before_tmp = tree_hash(world["root"]), tree_hash(tmp_path)
    with pytest.raises(SystemExit) as exc:
        run_cli(MAINS[stage], args)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2, err
    last = re.split(r"[\r\n]+", err)[-1]  # what came before, if anything, is a closed progress bar
    assert last.startswith("error: ") and err.count("error:") == 1 and "Traceback" not in err, err
    assert case.expect in last, err
    assert tree_hash(world["root"]) == before_world  # every input unchanged
    assert tree_hash(tmp_path) == before_tmp  # nothing written (no output, no staging left behind)


# ---- the environment: an unwritable folder, a full disk ----------------------------------------------

WRITING_STAGES = ("train", "slot_stats", "continual", "evaluate", "update", "gate")  # the tiny world's stages


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A folder this process cannot create anything in (root ignores permissions: /sys refuses it too)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    try:
        os.rmdir(tempfile.mkdtemp(dir="/sys"))
    except OSError:
        return Path("/sys")
    pytest.skip("no unwritable folder on this machine")


@pytest.mark.parametrize("stage", WRITING_STAGES)
def test_an_unwritable_output_folder_is_one_line(stage, world, unwritable, capsys):
    out = unwritable / "slotwise-out"
    before = tree_hash(world["root"])
    with pytest.raises(SystemExit) as exc:
        run_cli(MAINS[stage], stage_args(stage, world, out))
    err = capsys.readouterr().err  # progress bars (\r) may come first
    errors = re.findall(r"error: [^\r\n]*", err)
    assert exc.value.code == 2 and "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith(f"error: {out}") and "cannot write it (" in errors[0], err  # train: its --state first
    assert not out.exists() and tree_hash(world["root"]) == before


def _file_size_limit(limit: int):
    def limit_writes():  # writes past `limit` bytes fail with EFBIG, as on a full disk (ENOSPC), instead of a signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_writes


@pytest.mark.parametrize("stage", ["update", pytest.param("train", marks=pytest.mark.slow), pytest.param("slot_stats", marks=pytest.mark.slow)])
def test_a_full_disk_is_one_line_and_leaves_nothing(stage, world, tmp_path):
    """A real `python -m slotwise.components.<stage>` whose writes fail midway (a 2 kB file size limit)."""
    out = tmp_path / "out"
    before = tree_hash(world["root"])
    proc = subprocess.run([sys.executable, "-m", f"slotwise.components.{stage}", *stage_args(stage, world, out)],
                          preexec_fn=_file_size_limit(2000), capture_output=True, text=True, timeout=900, cwd=REPO)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and "cannot write it (File too large)" in errors[0], proc.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == [], list(tmp_path.iterdir())  # no output, no staging left
    assert tree_hash(world["root"]) == before


def test_memory_layers_the_model_lacks_are_one_line(world, tmp_path, smol_tokenizer, monkeypatch, capsys):
    """retrofit.insert.layers=[99] can only be refused once the model is loaded (here a 2-layer Llama)."""
    from conftest import small_llama

    monkeypatch.setattr(retrofit, "load_base_model", lambda source, dtype: (small_llama(len(smol_tokenizer)), smol_tokenizer))
    with pytest.raises(SystemExit) as exc:
        run_cli(retrofit.main, ["--params", str(world["params"]), "--out", str(tmp_path / "out"), "retrofit.insert.layers=[99]"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err == ("error: key 'retrofit.insert.layers': layers [99] do not exist: "
                                           "the model has 2 layers (indices 0..1)"), err
    assert not any(tmp_path.iterdir())


def test_a_state_written_under_torchrun_is_an_earlier_output(tmp_path):
    """train --nproc keeps one state folder per rank (<state>/rank<r>-of-<W>/state.json): resuming into it is allowed."""
    import argparse

    from slotwise.components._cli import check_outputs
    from slotwise.errors import ConfigError

    state = tmp_path / "out_state"
    (state / "rank0-of-2").mkdir(parents=True)
    (state / "rank0-of-2" / "state.json").write_text("{}")
    check_outputs(argparse.Namespace(out=str(tmp_path / "out"), state=str(state)))
    (tmp_path / "foreign" / "rank0-of-2").mkdir(parents=True)
    with pytest.raises(ConfigError, match="not an earlier output"):
        check_outputs(argparse.Namespace(out=str(tmp_path / "out"), state=str(tmp_path / "foreign")))
