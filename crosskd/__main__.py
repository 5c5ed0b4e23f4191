"""`python -m crosskd ...` and `torchrun -m crosskd ...` run the command line."""

from crosskd.cli import main

if __name__ == "__main__":
    main()
