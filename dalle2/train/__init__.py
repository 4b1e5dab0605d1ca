"""Training: one loop for every model, run by Ray Train workers with a DeepSpeed engine.

    config      the job's YAML config (dataclasses, strict types) and its model config
    deepspeed_config  our config -> a DeepSpeed config dict
    schedule    LR warmup + cosine decay
    ema         EMA of the weights, sharded across ranks (safe under ZeRO-3)
    tasks       per-model batch -> loss (CLIP, prior, decoder, upsampler), plain PyTorch
    samples     PNG grids of samples at validation
    checkpoint  what a checkpoint holds, its manifest, fetching the part of it a rank or an export reads
    export      ZeRO consolidation and the EMA -> a model bundle (`dalle2 export`)
    loop        the worker function (deepspeed imported inside it)
    launch      the driver: checks before anything starts, TorchTrainer, progress, metrics CSV
    cli         ``dalle2 train ...`` and ``dalle2 export ...``

Nothing is imported here: Ray imports these modules on every worker.
"""
