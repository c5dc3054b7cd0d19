"""Local servers on 127.0.0.1 for the tests and for `cluster/local.sh` (not in the wheel).

    procs.py    process supervision: a server in its own session, stopped by it (and by a marker
                its Ray job drivers carry), dying with a test that started it
    servers.py  SeaweedS3 (S3), MLflowServer, RayHead: each a context manager with ports of its own
    stack.py    Stack: the three together, state in one directory; `python -m msprior.devstack
                up|down|env|status` (what cluster/local.sh runs)

The job's runtime env (`cluster/local.sh runtime-env`) is cluster/job_env.py's.
"""

from msprior.devstack.servers import MLflowServer, RayHead, SeaweedS3
from msprior.devstack.stack import Stack

__all__ = ["SeaweedS3", "MLflowServer", "RayHead", "Stack"]
