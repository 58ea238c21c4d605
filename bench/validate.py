"""`profile-relay validate` on a large config: 5,000 segments, 200 dataflows.

Prints the time of the whole validation (parse with PyYAML, pydantic models, cross
checks, secret references) beside a baseline measured in the same run: parsing the same
file with PyYAML's C loader alone, the floor for reading it. Target: under 1 s.

    .venv/bin/python bench/validate.py [--segments 5000] [--dataflows 200] [--repeat 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from config import load_config  # noqa: E402


def write_config(path: Path, segments: int, dataflows: int) -> None:
    per_flow = max(1, segments // dataflows)
    doc = {
        "state": "relay.db",
        "segments": [{"id": f"seg-{i:05d}", "name": f"Segment {i}", "createdAt": 1648553325000,
                      "updatedAt": 1648553330000} for i in range(segments)],
        "destinations": [{"name": f"d{i}", "endpoint": f"https://x{i}.example.com/hook"}
                         for i in range(20)],
        "dataflows": [{"name": f"f-{i:03d}", "destination": f"d{i % 20}",
                       "segments": [f"seg-{(i * per_flow + j) % segments:05d}"
                                    for j in range(per_flow)],
                       "attributes": ["person.name.firstName", "personalEmail.address"]}
                      for i in range(dataflows)],
    }
    path.write_text(yaml.safe_dump(doc))


def best_of(repeat: int, fn) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segments", type=int, default=5_000)
    parser.add_argument("--dataflows", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.yaml"
        write_config(path, args.segments, args.dataflows)
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        baseline = best_of(args.repeat, lambda: yaml.load(path.read_text(), Loader=loader))
        ours = best_of(args.repeat, lambda: load_config(path))
        size = path.stat().st_size
    print(f"config: {args.segments} segments, {args.dataflows} dataflows, {size:,} bytes")
    print(f"baseline (PyYAML {loader.__name__} parse only): {baseline:.3f} s")
    print(f"ours (load_config: parse + validate):          {ours:.3f} s  "
          f"ratio {ours / baseline:.2f}  target < 1 s: {'met' if ours < 1 else 'missed'}")


if __name__ == "__main__":
    main()
