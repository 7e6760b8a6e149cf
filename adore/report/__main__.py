import sys

from adore.report.cli import main

sys.exit(main())
