"""`python -m server` is `softprompt-server`."""

import sys

from server.cli import main

sys.exit(main())
