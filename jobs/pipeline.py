"""The msprior pipeline as a Ray job (same flags as `msprior pipeline`):

    ray job submit --working-dir . -- python jobs/pipeline.py \\
        --audio s3://bucket/corpus --rave s3://bucket/rave.ts --out s3://bucket/msprior/NAME \\
        --config decoder_only --name NAME [--tune] [--num_workers 4 --gpu 0] [--override k=v ...]

Inside a job, `ray.init()` (called by each stage) attaches to the cluster that runs the job.
Re-submitting after a failure continues where it stopped: finished stages are skipped. A
re-submission with other arguments for a finished stage is refused in one line (`--force STAGE`
redoes it and the stages after it).
"""

import os
import sys

# the job's working dir holds the msprior package; `python jobs/pipeline.py` only puts jobs/ on the path
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from msprior.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["pipeline", *sys.argv[1:]])
