"""The Quickstart's main job (`python -m blockdrop.quickstart --help`): blockdrop.cli.run_quickstart."""
from blockdrop.cli import quickstart

if __name__ == "__main__":
    quickstart()
