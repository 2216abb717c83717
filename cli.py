"""`python cli.py …` in a clone runs the kmel command line (kmel/cli.py); installed, it is `kmel …`."""
from kmel.cli import cli, main  # noqa: F401

if __name__ == "__main__":
    main()
