"""Print this package's requirements from pyproject.toml, one per line: its dependencies and those of
the extras named (the image installs them in a layer of their own, before the code).

    python3 scripts/requirements.py eval continual pipeline > requirements.txt
"""
from __future__ import annotations

import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise ValueError(f"pyproject.toml: unknown extra(s) {', '.join(unknown)} (expected some of: {', '.join(optional)})")
    out = list(project.get("dependencies", []))
    for extra in extras:
        out += [r for r in optional[extra] if r not in out]
    return out


def main(argv: list[str]) -> int:
    path = Path(__file__).with_name("pyproject.toml")  # beside this script in the image's build layer
    if not path.is_file():
        path = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        print("\n".join(requirements(tomllib.loads(path.read_text()), argv)))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
