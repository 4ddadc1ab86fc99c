"""Fuzz the decoder with whole mutated payloads (checksum recomputed, so the deep checks are
reached): `--cases` mutations of honest uploads of every encoding, each decoded on the server
path (expected shapes) and without shapes. Every outcome must be a PayloadError or a correct
decode; the run stops at the first other exception. Prints and writes the counts and the peak
memory (tracemalloc) of the whole run.

    .venv/bin/python benchmarks/fuzz_payloads.py --cases 20000

Writes benchmarks/results/fuzz_payloads.{json,md}. The test suite runs 600 cases of the same
fuzzer (tests/test_hostile_decoder.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_hostile_decoder import fuzz  # noqa: E402 - the suite's fuzzer, run longer

RESULTS = ROOT / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    tracemalloc.start()
    t0 = time.perf_counter()
    counts = fuzz(args.cases, args.seed)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    row = {"cases": args.cases, "decodes": 2 * args.cases, **counts, "other_exceptions": 0, "seconds": seconds,
           "peak_traced_mib": peak / 2**20, "seed": args.seed, "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fuzz_payloads.json").write_text(json.dumps(row, indent=2) + "\n")
    md = (f"# Decoder fuzz: {args.cases} mutated payloads, checksum recomputed\n\n"
          f"`.venv/bin/python benchmarks/fuzz_payloads.py --cases {args.cases} --seed {args.seed}` on {row['date']}\n\n"
          "| cases | decodes | PayloadError | correct decodes | other exceptions | peak traced memory | seconds |\n"
          "|---|---|---|---|---|---|---|\n"
          f"| {args.cases} | {row['decodes']} | {counts['rejected']} | {counts['decoded']} | 0 | "
          f"{row['peak_traced_mib']:.1f} MiB | {seconds:.0f} |\n")  # fmt: skip
    (RESULTS / "fuzz_payloads.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
