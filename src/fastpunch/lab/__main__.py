import sys

from fastpunch.lab.cli import main

sys.exit(main())
