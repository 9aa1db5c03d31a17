"""Train BlockDrop on Ray Train (see `python train_job.py --help`)."""
from blockdrop.cli import train

if __name__ == "__main__":
    train()
