"""`python -m local_runner ...`"""
import sys

from local_runner.cli import main

sys.exit(main())
