"""`python -m calibserve.server serve ...`: the server CLI without the console script."""

from calibserve.server.cli import app

if __name__ == "__main__":
    app()
