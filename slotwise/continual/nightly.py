"""The nightly knowledge update's logic: new fact files -> SMF on the served model -> a cumulative
sparse delta, and the retention gate that decides whether it is promoted.

    files = jsonl_files("drop/")                     # every *.jsonl entry under a folder or an s3:// prefix
    facts = read_facts(fact_files(files, work), include_statement=True)   # DataError names file:line and field
    model, tokenizer, served = load_served(base_dir, "serve/current")
    new, losses = sparse_update(model, tokenizer, facts, backgrounds, n, device)
    delta = cumulative(served, new, meta)            # base -> served -> tonight's facts
    probes = Probes(model, tokenizer, n, data_dir, facts, device)
    passed, drops, reasons = decide(probes.measure(served_model, tok), probes.measure(candidate, tok), n.max_retention_drop)

The stages that run it are `slotwise update` (components/update.py) and `slotwise gate`
(components/gate.py); the Prefect flow (flows/nightly.py) orchestrates them, screens the drop's
files one by one first (slotwise/continual/drop.py) and promotes through the serving directory
(slotwise/continual/serving.py).
"""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import torch

from slotwise import storage
from slotwise.checkpoint import load_checkpoint
from slotwise.config import NightlyParams
from slotwise.continual.delta import META, SparseDelta, apply_delta, extract_delta, load_delta, stack
from slotwise.continual.experiment import fact_batch, qa_score, relative_drop, screen_known
from slotwise.continual.updaters import make_updater
from slotwise.errors import CheckpointError, DataError, DeltaError
from slotwise.evaluation.perplexity import perplexity, token_blocks
from slotwise.facts import check_record
from slotwise.retrofit import memory_layers
from slotwise.sources import read_jsonl

FACT_FIELDS = ("id", "answers", "paraphrases", "probe")
HELDOUT = Path("background") / "heldout.jsonl"
TRIVIAQA = Path("tasks") / "triviaqa.jsonl"
LOWER_IS_BETTER = ("heldout_ppl",)
INFORMATIONAL = ("new_facts_em",)


# --- new facts ------------------------------------------------------------------------------------

def _hidden(parts) -> bool:
    return any(part.startswith(".") for part in parts)


def jsonl_files(location: str) -> list[str]:
    """Every entry named *.jsonl under a folder (absolute paths, links not resolved nor followed,
    whatever their kind: read_jsonl and the nightly screen refuse what is not a regular file) or
    every such object under an s3:// prefix; hidden parts skipped; sorted. None if the location does
    not exist."""
    if storage.is_s3(location):
        prefix = location.rstrip("/") + "/"
        return sorted(u for u in storage.list_prefix(location) if u.endswith(".jsonl") and not _hidden(u[len(prefix):].split("/")))
    root = Path(location).resolve()
    if not root.is_dir():
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel = Path(dirpath).relative_to(root).parts
        found += [os.path.join(dirpath, n) for n in dirnames + filenames if n.endswith(".jsonl") and not _hidden(rel + (n,))]
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and not d.endswith(".jsonl")]
    return sorted(found)


def fact_files(sources: list[str], workdir: Path) -> list[Path]:
    """Each --facts source (file or folder, local or s3://) -> local *.jsonl files, sorted per source.

    An s3:// source may be a slotwise publish (verified), a single object or a plain prefix (facts are
    dropped by other tools: read unverified, then validated line by line like any facts file)."""
    files: list[Path] = []
    for i, src in enumerate(sources):
        path = storage.fetch(src, workdir / f"facts-{i}", storage.S3Options(allow_unpublished=True)) if storage.is_s3(src) else Path(src)
        if path.is_dir():
            files.extend(Path(f) for f in jsonl_files(str(path)))
        elif path.exists():  # read_jsonl refuses what is not a regular file (a FIFO, ...) with one line
            files.append(path)
        else:
            raise FileNotFoundError(f"{src}: no such facts file or folder")
    return files


def read_facts(files: list[Path], include_statement: bool) -> list[dict]:
    """Every fact of the files, in order; a malformed line raises DataError naming file:line and the field."""
    need = FACT_FIELDS + (("statement",) if include_statement else ())
    facts = []
    for path in files:
        for lineno, rec in read_jsonl(path, need):
            check_record(rec, f"{path}:{lineno}", need)
            facts.append({**rec, "_file": str(path), "_line": lineno})
    return facts


def trainable_batch(fact: dict, tokenizer, n: NightlyParams) -> dict[str, torch.Tensor]:
    """The fact's training batch; DataError (naming file:line) if no text holds its answer within max_len tokens."""
    try:
        return fact_batch(fact, tokenizer, n.include_statement, n.max_len)
    except ValueError:
        raise DataError(f"{fact.get('_file', 'facts')}:{fact.get('_line', '?')}: the first answer lies beyond "
                        f"nightly.max_len={n.max_len} tokens in every paraphrase (nothing to train on)") from None


# --- the update -----------------------------------------------------------------------------------

def served_delta_dir(path: str | None) -> Path | None:
    """--deltas -> the delta directory to apply, or None (nothing promoted yet)."""
    if not path:
        return None
    p = Path(path)
    for cand in (p, p / "current"):
        if (cand / META).is_file():
            return cand
    if not p.exists() or (p.is_dir() and not any(p.iterdir())) or (p / "registry.json").is_file():
        return None  # no delta yet, an empty folder, or a serving directory with nothing promoted
    raise DeltaError(f"{path}: not a sparse delta directory (no {META}) nor a serving directory with current/")


def load_served(model_dir: Path, deltas: str | None):
    """Base checkpoint + the served delta applied -> (model, tokenizer, served delta or None)."""
    model, tokenizer = load_checkpoint(model_dir)  # verifies every file against manifest.json
    if not memory_layers(model):
        raise CheckpointError(f"{model_dir}: no memory layers; the nightly update needs a retrofitted checkpoint")
    if tokenizer is None:
        raise CheckpointError(f"{model_dir}: no tokenizer saved with the checkpoint")
    served = None
    delta_dir = served_delta_dir(deltas)
    if delta_dir is not None:
        served = load_delta(delta_dir)
        try:
            apply_delta(model, served)
        except DeltaError as exc:
            raise DeltaError(f"{delta_dir}: the served delta does not apply to {model_dir} ({exc})") from None
    return model, tokenizer, served


def sparse_update(model, tokenizer, facts: list[dict], bgs, n: NightlyParams, device: torch.device) -> tuple[SparseDelta, list[float]]:
    """SMF over the facts (one batch of paraphrases per fact, steps_per_fact steps) -> (delta vs the start, losses)."""
    start = copy.deepcopy(model)
    torch.manual_seed(n.seed)
    updater = make_updater("smf", model.to(device), n.smf, backgrounds=bgs)
    model.train()
    losses = []
    for fact in facts:
        batch = {k: v.to(device) for k, v in trainable_batch(fact, tokenizer, n).items()}
        for _ in range(n.steps_per_fact):
            losses.append(updater.step(batch)["loss"])
    model.cpu().eval()
    return extract_delta(start, model), losses


def cumulative(served: SparseDelta | None, new: SparseDelta, meta: dict) -> SparseDelta:
    """stack(served, new) with a flat history: one meta entry per nightly update."""
    history = list(served.meta.get("history", [])) if served is not None else []
    delta = stack(served, new) if served is not None else new
    delta.meta = {**meta, "updates": len(history) + 1, "history": history + [meta["update"]]}
    return delta


# --- the gate -------------------------------------------------------------------------------------

def decide(current: dict, candidate: dict, max_drop: float) -> tuple[bool, dict, list[str]]:
    """-> (passed, relative drop per retention metric, reasons for a failure). None-valued metrics are skipped."""
    drops, reasons = {}, []
    for key, before in current.items():
        if key in INFORMATIONAL:
            continue
        after = candidate.get(key)
        if before is not None and (after is None or not math.isfinite(after)):
            drops[key] = None
            reasons.append(f"{key} is {after} for the candidate ({before:.4g} for the served model): not measurable, a broken model")
            continue
        drop = relative_drop(before, after, higher_is_better=key not in LOWER_IS_BETTER)
        drops[key] = drop
        if drop is not None and drop > max_drop:
            reasons.append(f"{key} dropped {drop:.1%} ({before:.4g} -> {candidate[key]:.4g}; at most {max_drop:.1%} allowed)")
    return not reasons, drops, reasons


class Probes:
    """What both models are measured on, fixed once (the known set is screened on the served model)."""

    def __init__(self, model, tokenizer, n: NightlyParams, data_dir: Path, new_facts: list[dict], device: torch.device):
        e = n.eval
        texts = (r["text"] for _, r in read_jsonl(data_dir / HELDOUT, ("text",)))
        self.blocks = token_blocks(tokenizer, texts, e.ppl_seq_len, e.ppl_blocks)
        if len(self.blocks) == 0:
            raise CheckpointError(f"{data_dir / HELDOUT}: fewer than {e.ppl_seq_len} tokens (nightly.eval.ppl_seq_len)")
        self.known = []
        if e.known_screen:
            qa = [r for _, r in read_jsonl(data_dir / TRIVIAQA, ("question", "answers"))][: e.known_screen]
            self.known = screen_known(model.to(device), tokenizer, qa, e.batch_size)
        self.new_facts = [{"probe": f["probe"], "answers": f["answers"]} for f in new_facts]
        self.tasks = [t for t in e.tasks]
        self.data_dir, self.p, self.device = data_dir, e, device

    def measure(self, model, tokenizer) -> dict:
        model.to(self.device).eval()
        out = {"heldout_ppl": perplexity(model, self.blocks.to(self.device), batch_size=self.p.batch_size),
               "known_em": qa_score(model, tokenizer, self.known, self.p.batch_size)["exact_match"],
               "new_facts_em": qa_score(model, tokenizer, self.new_facts, self.p.batch_size)["exact_match"]}
        if self.tasks:
            from slotwise.evaluation.tasks import run_tasks

            scores = run_tasks(model, tokenizer, self.tasks, self.data_dir / "tasks", {t: self.p.task_limit for t in self.tasks},
                               batch_size=self.p.batch_size, seed=0)
            for task, m in scores.items():
                out[task] = m.get("acc_norm", m.get("acc"))
        model.cpu()
        return out
