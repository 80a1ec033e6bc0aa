"""`python -m ersm ...`: the ersm command line, as the `ersm` binary runs it."""

import sys

from . import cli


def main():
    sys.exit(cli(sys.argv[1:]))


if __name__ == "__main__":
    main()
