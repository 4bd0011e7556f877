"""``python -m data_prep.convert``: see `data_prep.convert.cli`."""

import sys

from data_prep.convert import cli

if __name__ == "__main__":
  sys.exit(cli.main())
