"""Print what the last pipeline run produced: one line per stage output found under runs/.

    python -m slotwise.components.report [--runs runs]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slotwise report", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs")
    args = parser.parse_args(argv)
    runs = Path(args.runs)
    found = sorted(runs.glob("*/summary.json"))
    if not found:
        print(f"no stage summaries under {runs}/ yet")
        return 1
    for path in found:
        s = json.loads(path.read_text())
        if path.parent.name == "retrofit":
            print(f"retrofit: {s['base_model']} ({s['architecture']}), memory at layers {s['layers']} "
                  f"({s['n_slots_per_layer']:,} slots each): {s['memory_params']:,} memory params beside "
                  f"{s['base_params']:,} base; max |logit diff| {s['check_max_abs_logit_diff']:.3g}; "
                  f"'{s['check_prompt']}' ->{s['check_next_token']!r}")
        else:
            print(f"{path.parent.name}: {json.dumps(s)[:300]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
