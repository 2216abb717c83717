"""``python -m kmel …``: the kmel command line."""

from kmel.cli import main

if __name__ == "__main__":
    main()
