"""`python -m advcap …`: the same command line as `advcap …`."""

from advcap.cli import main

if __name__ == "__main__":
    main()
