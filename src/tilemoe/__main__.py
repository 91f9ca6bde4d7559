import sys

from tilemoe.cli import main

sys.exit(main())
