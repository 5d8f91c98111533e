"""The keys of a run's checkpoints, named once.

A checkpoint ([save_checkpoint][subnets.runs.checkpoint.save_checkpoint]) is one dictionary:
``checkpoints/last.safetensors`` ([TrainingState.save][subnets.training.state.TrainingState.save])
holds the whole training state, ``checkpoints/best.safetensors``
([TrainingState.save_best][subnets.training.state.TrainingState.save_best]) the best model so far. Resume, best-model restore,
[load_run][subnets.runs.trained.load_run] (evaluation, prediction, export) and
``subnets.consolidate`` read them with these names. The strings
are the file format: changing one leaves every checkpoint written before unreadable.
"""


class Key:
    """The top-level entries of a checkpoint (last: in ``last.safetensors`` only; best: in
    ``best.safetensors`` only; sharded: in a sharded run's only)."""

    STEP = "step"  # int: the training step after which the checkpoint was written
    CONFIG = "config"  # the run's resolved config as a dictionary (checkpoint_config reads it alone)
    MODEL = "model"  # parameter name -> tensor: the whole model (a sharded one's: once consolidated)
    OPTIMIZER = "optimizer"  # last: the optimizer's state dict (gone with train.keep_optimizer_state=false)
    SCHEDULER = "scheduler"  # last: the learning-rate scheduler's state dict
    SAMPLER = "sampler"  # last: the language sampler's state (its generator and queues)
    METHOD = "method"  # the method's state dict (its masks and policy state)
    BEST = "best"  # last: the run's best development result, {"metric": float, "step": int}, or None
    METRIC = "metric"  # best: the development metric that made it the best model
    DIVERGENCE = "divergence"  # last: the loss guard's state dict
    RNG = "rng"  # last: Python's, NumPy's and torch's generator states (rank 0's)
    RNG_RANKS = "rng_ranks"  # last, sharded: every process's generator states, by rank
    SHARDED = "sharded"  # sharded: the name of the folder beside the file that holds the model's shards
    WORLD_SIZE = "world_size"  # last, sharded: the number of processes that wrote the shards

    # A sharded checkpoint's folder (subnets.parallel.sharding, torch.distributed.checkpoint) holds MODEL
    # and, for last, OPTIMIZER under the same names.
