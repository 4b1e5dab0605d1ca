"""What shuffling costs the training reader: part of ``dalle2 bench data``.

Training does not read through ``streaming_split``: each Train worker runs its own
:class:`dalle2.data.stream.TrainingStream` (its pieces of the epoch plan, decoded in order, rows
mixed in windows; see :mod:`dalle2.data.epochs`). This measures that reader twice over the same
files, in alternating rounds: shuffled (``data.shuffle`` as training uses it: a new piece order
every epoch, rows permuted in windows of ``buffer_rows``) and in file order (``mode: none``, the
same machinery without the permutations). Each round is one whole epoch read by 2 actors
standing in for Train workers (half a CPU each), as a 2-worker job reads it. Target: shuffling
costs < 10% of the images/s.
"""

from __future__ import annotations

from typing import Optional

TARGET_SHUFFLE_COST = 0.10


class StreamReader:
    """A Ray actor standing in for one Train worker: drains one epoch of its training stream."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def epoch(self, source, epoch: int, batch_size: int) -> int:
        from dalle2.data.epochs import DataPosition
        from dalle2.data.stream import TrainingStream

        stream = TrainingStream(source, self.rank, self.world_size, batch_size, DataPosition(epoch, 0))
        rows = sum(len(batch["key"]) for batch in stream.batches_of_epoch(epoch))
        return rows


def shuffle_cost(data_config, workers: int, batch_size: int, buffer_rows: int, repeats: int, warmup: int, seed: int) -> dict:
    """images/s of the training reader shuffled and in file order (medians of interleaved
    whole epochs) and the fraction shuffling costs."""
    import ray

    from dalle2.bench.timing import interleaved, summary
    from dalle2.data.epochs import ShuffleConfig, ShuffleMode
    from dalle2.data.ray_reader import DroppedRows, preprocess_concurrency
    from dalle2.data.schema import TRAINING_COLUMNS
    from dalle2.data.stream import training_source

    tasks = preprocess_concurrency(data_config)
    modes = {
        "shuffled": ShuffleConfig(mode=ShuffleMode.FILES_AND_ROWS, seed=seed, buffer_rows=buffer_rows),
        "file_order": ShuffleConfig(mode=ShuffleMode.NONE, seed=seed, buffer_rows=buffer_rows),
    }
    sources = {name: training_source(data_config, shuffle, workers, dropped=DroppedRows.remote(), tasks=tasks,
                                     columns=TRAINING_COLUMNS)
               for name, shuffle in modes.items()}  # fmt: skip
    reader_class = ray.remote(num_cpus=0.5)(StreamReader)
    readers = [reader_class.remote(rank, workers) for rank in range(workers)]
    epochs = {name: 0 for name in modes}  # each round reads the next epoch: a new plan when shuffled
    delivered = {name: 0 for name in modes}

    def reader(name: str):
        def read() -> None:
            epoch, epochs[name] = epochs[name], epochs[name] + 1
            delivered[name] = sum(ray.get([r.epoch.remote(sources[name], epoch, batch_size) for r in readers]))

        return read

    try:
        samples = interleaved({name: reader(name) for name in modes}, repeats, warmup)
    finally:
        for actor in readers:
            ray.kill(actor)
    result = {}
    for name in modes:
        epoch = summary(samples[name])
        result[name] = {"images_per_s": round(delivered[name] / epoch["median_s"], 1), "images_per_epoch": delivered[name],
                        "epoch_s": round(epoch["median_s"], 3)}  # fmt: skip
    cost = 1 - result["shuffled"]["images_per_s"] / result["file_order"]["images_per_s"]
    return {
        "what": f"the training reader (dalle2.data.stream) into {workers} actors, shuffle buffer {buffer_rows} rows",
        **result,
        "shuffle_cost": round(cost, 4),
        "target": TARGET_SHUFFLE_COST,
        "met": cost < TARGET_SHUFFLE_COST,
        "spread": _spread(samples),
    }


def _spread(samples: dict) -> dict:
    """Each reader's epoch times, to see the noise the medians sit in."""
    return {name: [round(s.wall_s, 3) for s in values] for name, values in samples.items()}


def format_shuffle_cost(result: Optional[dict]) -> list[str]:
    if not result:
        return []
    mark = "met" if result["met"] else "missed"
    return [
        f"  {result['what']}:",
        f"    shuffled {result['shuffled']['images_per_s']:.0f} images/s, file order {result['file_order']['images_per_s']:.0f} "
        f"images/s: shuffling costs {100 * result['shuffle_cost']:.1f}% (target < {100 * TARGET_SHUFFLE_COST:.0f}%: {mark})",
    ]
