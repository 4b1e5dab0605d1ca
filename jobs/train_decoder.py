"""Train the decoder: ``python -m jobs.train_decoder --config jobs/configs/decoder-tiny-cpu.yaml --data URI ...``
(the arguments of ``dalle2 train decoder``; see dalle2.train.cli)."""

import sys

from dalle2.train.cli import main_for_job

if __name__ == "__main__":
    sys.exit(main_for_job("decoder"))
