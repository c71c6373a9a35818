"""Ingest an archive (or synthetic data) into an analysis-ready store and index its windows.

python jobs/ingest.py --config jobs/configs/fraser.yaml
ray job submit --working-dir . -- python jobs/ingest.py --config jobs/configs/radolan.yaml
"""

from __future__ import annotations

import json
import sys

from _common import job_parser
from cloudburst.config import ConfigError, DatasetJobConfig, load_config
from cloudburst.data.prepare import prepare_dataset


def main(argv: list[str] | None = None) -> int:
    args = job_parser(__doc__.splitlines()[0]).parse_args(argv)
    try:
        cfg = load_config(DatasetJobConfig, args.config, args.overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(json.dumps(prepare_dataset(cfg), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
