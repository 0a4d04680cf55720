"""Check an ingested dataset or a slices dir before a long run: every volume or shard, read in full.

    python -m data_prep.verify --dataset DATASET_DIR [--workers N]
    python -m data_prep.verify --slices SLICES_DIR [--workers N]

A dataset: every listed volume and label map is present, opens, has its manifest shape and dtype, has no
missing chunk, and hashes to the manifest's content_sha256; all volumes share the dataset's spacing. A slices
dir: every shard is present, opens, matches its sha256 in index.json, every record passes ArrayRecord's chunk
hashes and decodes to a slice of the index's size, and the records are where the index says
(`flexict_jax.data.verify` holds the checks). Each problem is one "path: reason" line on stderr.
Exit status: 0 all good, 2 something is broken (listed), 1 bad arguments.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from data_prep import outputs
from flexict_jax.data import verify

EXIT_OK, EXIT_BROKEN = 0, 2


def build_parser() -> argparse.ArgumentParser:
    parser = outputs.ExitOneParser(
        prog="python -m data_prep.verify", description=__doc__.split("\n\n")[0],
        epilog="Exit status: 0 all good, 2 something is broken (listed on stderr), 1 bad arguments.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--dataset", metavar="DATASET_DIR", help="an ingested dataset (manifest.jsonl)")
    what.add_argument("--slices", metavar="SLICES_DIR", help="a slices dir (index.json + ArrayRecord shards)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="volumes or shards checked at a time, on threads (default 1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        build_parser().error(f"--workers {args.workers}: need at least 1")
    if args.dataset:
        report = verify.verify_dataset(args.dataset, workers=args.workers)
    else:
        report = verify.verify_slices(args.slices, workers=args.workers)
    for problem in report.problems:
        outputs.report(f"broken: {problem}")
    print(f"verify: {report.checked}: {report.items} checked, "
          + ("all good" if report.ok else f"{len(report.problems)} problem(s)"))
    return EXIT_OK if report.ok else EXIT_BROKEN


if __name__ == "__main__":
    sys.exit(main())
