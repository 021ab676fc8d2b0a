"""`python -m server serve ...`: the server CLI without the `calibserve` console script."""

from server.cli import app

if __name__ == "__main__":
    app()
