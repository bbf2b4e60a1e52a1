"""Allow `python -m prune`."""

from prune.cli import main

if __name__ == "__main__":
    main()
