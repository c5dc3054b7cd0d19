"""`python -m msprior.devstack up|down|env|status` (cluster/local.sh)."""

import sys

from msprior.devstack.stack import main

sys.exit(main())
