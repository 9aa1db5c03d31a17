"""Serve BlockDrop models over HTTP on Ray Serve (see `python serve_policy.py --help`)."""
from blockdrop.cli import serve

if __name__ == "__main__":
    serve()
