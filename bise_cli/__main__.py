"""Allow `python -m bise_cli ...`."""

from bise_cli.cli import main

if __name__ == "__main__":
    main()
