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
    print(json.dumps(prepare_dataset(cfg), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
