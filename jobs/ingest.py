"""Ingest an archive (or synthetic data) into an analysis-ready store and index its windows.

python jobs/ingest.py --config jobs/configs/fraser.yaml
ray job submit --working-dir . -- python jobs/ingest.py --config jobs/configs/radolan.yaml
"""

from __future__ import annotations

import json
import sys

from _common import load_job_config, setup_logging, take_verbose
from cloudburst.config import DatasetJobConfig
from cloudburst.data.prepare import prepare_dataset


def main(argv: list[str] | None = None) -> int:
    argv, verbose = take_verbose(argv)
    setup_logging(verbose)
    cfg = load_job_config(DatasetJobConfig, argv, __doc__.splitlines()[0], "ingest")
    summary = prepare_dataset(cfg)
    print(json.dumps(summary, indent=2))
    shape = "x".join(str(n) for n in summary.get("shape", []))
    windows = summary.get("windows", {}).get("all")
    # the summary alone on stdout (JSON); what was made and where, as the last console line
    target = summary.get("target", cfg.ingest.target)
    print(f"ingest: {target} ({shape}; {windows} windows)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
