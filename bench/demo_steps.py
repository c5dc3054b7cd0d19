"""The demo prior's validation curve for a choice of steps and validation cadence, on the table of
a finished `make demo` (msprior-demo/out/data): what `msprior demo`'s max_steps / val_every rest on.

    python bench/demo_steps.py DROPOUT MAX_STEPS VAL_EVERY NAME [override ...]
    python bench/demo_steps.py 0.01 300 100 b300                    # the demo before 2026-12-07 (baseline)
    python bench/demo_steps.py 0.01 300 25 p2 train.patience=2      # the demo since (msprior.demo)

Prints validation CE by step (MLflow's val_loss) and the training wall; compare runs made back to
back on the same machine. The table and the work folder come from the environment: DEMO_TABLE
(default msprior-demo/out/data), DEMO_WORK (default /var/tmp/demoexp).
"""

import os
import sys

import mlflow

from msprior.demo import DEMO_OVERRIDES
from msprior.train.run import train

TABLE = os.environ.get("DEMO_TABLE", "msprior-demo/out/data")
WORK = os.path.abspath(os.environ.get("DEMO_WORK", "/var/tmp/demoexp"))


def main() -> None:
    drop, steps, every, tag = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    extra = sys.argv[5:]
    uri = f"sqlite:///{WORK}/mlflow.db"
    s = train("decoder_only", TABLE, tag, overrides=DEMO_OVERRIDES + [f"model.dropout={drop}"] + extra,
              max_steps=steps, val_every=every, storage_path=f"{WORK}/runs", tracking_uri=uri)
    h = mlflow.tracking.MlflowClient(uri).get_metric_history(s["mlflow_run_id"], "val_loss")
    print(tag, drop, extra, [(m.step, round(m.value, 3)) for m in sorted(h, key=lambda m: m.step)],
          "wall", s.get("wall_s") or s.get("wall"))


if __name__ == "__main__":
    main()
