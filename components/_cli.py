"""What every component's command line shares: --params, --out, key=value overrides, and the
rule that bad input ends in one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from slotwise.errors import USER_ERRORS, ConfigError
from slotwise.storage import S3Options, fetch, is_s3, publish

INPUTS = ("params", "model", "data", "stats", "facts", "deltas", "current", "candidate")
# What an existing output directory must hold to be replaced (anything else is not ours to delete).
# Glob patterns; a state written under torchrun holds one folder per rank (slotwise.training.train).
OUTPUTS = {"out": ("params.resolved.yaml",), "state": ("state.json", "trainer.pt", "rank*-of-*/state.json")}


class ComponentParser(argparse.ArgumentParser):
    """parse_args also refuses outputs that would destroy an input or something that is not an output."""

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        check_outputs(ns)
        return ns


def component_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = ComponentParser(prog=prog, description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(UNPUBLISHED, action="store_true",
                        help="also read s3:// inputs not published by slotwise (no LATEST, no sha256 metadata), unverified")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="params overrides, e.g. retrofit.insert.memory.n_keys=64")
    return parser


def _real(path: str) -> Path:
    return Path(os.path.realpath(path))


def check_outputs(ns: argparse.Namespace) -> None:
    """Refuse (ConfigError) an output path that is, contains or lies inside an input path, or that
    exists but is not an earlier output of its kind (a file, a link, a foreign non-empty folder)."""
    inputs = [(f"--{dest}", v) for dest in INPUTS for v in _values(getattr(ns, dest, None))
              if not is_s3(v) and os.path.lexists(v)]
    outputs = {dest: getattr(ns, dest, None) for dest in OUTPUTS}
    if "state" in ns and ns.state is None and ns.out:  # train's default state directory
        outputs["state"] = f"{ns.out}_state"
    outputs = {d: v for d, v in outputs.items() if v and not is_s3(v)}
    for dest, value in outputs.items():
        flag, out = f"--{dest}", _real(value)
        for other, path in inputs + [(f"--{d}", v) for d, v in outputs.items() if d != dest]:
            src = _real(path)
            if out == src:
                raise ConfigError(f"{flag} {value}: is the input {other} {path}; refusing to overwrite an input")
            if out in src.parents:
                raise ConfigError(f"{flag} {value}: contains the input {other} {path}; refusing to replace it")
            if src in out.parents:
                raise ConfigError(f"{flag} {value}: lies inside the input {other} {path}; refusing to write into an input")
        p = Path(value)
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            raise ConfigError(f"{flag} {value}: exists and is not a directory; refusing to replace it (a stage writes a directory)")
        if p.is_dir() and any(p.iterdir()) and not any(any(p.glob(m)) for m in OUTPUTS[dest]):
            raise ConfigError(f"{flag} {value}: an existing folder that is not an earlier output (no {' or '.join(OUTPUTS[dest])}); "
                              f"refusing to replace it")


def _values(value) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


@contextlib.contextmanager
def s3_paths(argv: list[str]) -> Iterator[tuple[list[str], tuple[str, str] | None]]:
    """Let every stage take s3:// URIs for its path flags.

    Inputs (--params, --model, --data, --stats, --deltas) are fetched, checksums verified, into a
    temporary directory (with --s3-unpublished, also prefixes and objects slotwise did not publish,
    unverified); --facts URIs are passed on (the stage reads them: drops are plain uploads); an --out
    URI is written locally and published after the stage succeeds (storage.publish: readers see the
    old artifact or the new one, whole). Yields the rewritten argv and (out URI, local out path) or None.
    """
    if not any(is_s3(a) for a in argv):
        yield argv, None
        return
    tmp = Path(tempfile.mkdtemp(prefix="slotwise-s3-"))
    out = None
    new = list(argv)
    options = S3Options(allow_unpublished=UNPUBLISHED in argv)
    try:
        for i, value in enumerate(argv):
            if not is_s3(value):
                continue
            flag = argv[i - 1] if i else ""
            if flag == "--out":
                local = tmp / "out" / value.rstrip("/").rsplit("/", 1)[-1]
                out, new[i] = (value, str(local)), str(local)
            elif flag in S3_INPUT_FLAGS:
                new[i] = str(fetch(value, tmp / f"in{i}", options))
            elif flag not in S3_PASSED_FLAGS:
                raise ConfigError(f"{flag or 'argument'} {value}: s3:// URIs are accepted for "
                                  f"{', '.join(S3_INPUT_FLAGS + S3_PASSED_FLAGS)} and --out only")
        yield new, out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


S3_INPUT_FLAGS = ("--params", "--model", "--data", "--stats", "--deltas")
S3_PASSED_FLAGS = ("--facts",)  # the stage reads these URIs itself (slotwise.continual.nightly.fact_files)
UNPUBLISHED = "--s3-unpublished"


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a component's main; user errors become one line on stderr and exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # SIGTERM (a scheduler's cancel, `kill`, DVC's stop) unwinds like Ctrl-C, so staged outputs remove
    # their staging folders instead of leaving `.<out>.tmp-*` behind; exit status 143 as for a plain kill.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        with s3_paths(sys.argv[1:] if argv is None else list(argv)) as (args, out):
            code = main(args)
            if out is not None and not code and Path(out[1]).exists():  # a stage may write nothing (update: no new facts)
                publish(out[1], out[0])
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # the environment: an unwritable folder, a full disk, a read error
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
