"""`python -m peft_spectral ...`: the same as the `peft-spectral` command."""

import sys

from .cli import main


if __name__ == "__main__":
    sys.exit(main())
