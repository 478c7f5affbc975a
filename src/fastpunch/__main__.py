import sys

from fastpunch.cli import main

sys.exit(main())
