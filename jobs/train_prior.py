"""Train the prior: ``python -m jobs.train_prior --config jobs/configs/prior-tiny-cpu.yaml --data URI ...``
(the arguments of ``dalle2 train prior``; see dalle2.train.cli)."""

import sys

from dalle2.train.cli import main_for_job

if __name__ == "__main__":
    sys.exit(main_for_job("prior"))
