"""Train the upsampler: ``python -m jobs.train_upsampler --config jobs/configs/upsampler-tiny-cpu.yaml --data URI ...``
(the arguments of ``dalle2 train upsampler``; see dalle2.train.cli)."""

import sys

from dalle2.train.cli import main_for_job

if __name__ == "__main__":
    sys.exit(main_for_job("upsampler"))
