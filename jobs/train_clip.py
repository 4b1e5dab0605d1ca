"""Train the clip: ``python -m jobs.train_clip --config jobs/configs/clip-tiny-cpu.yaml --data URI ...``
(the arguments of ``dalle2 train clip``; see dalle2.train.cli)."""

import sys

from dalle2.train.cli import main_for_job

if __name__ == "__main__":
    sys.exit(main_for_job("clip"))
