"""`python -m museum` (and `torchrun -m museum`) run the CLI."""

from museum.cli import app

if __name__ == "__main__":
    app()
