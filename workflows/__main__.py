import sys

from workflows.entrypoints.cli import main

sys.exit(main())
