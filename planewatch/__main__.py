import sys

from planewatch.cli import main

sys.exit(main())
