"""`python -m service` runs the govledger command."""

import sys

from service.cli import main

sys.exit(main())
