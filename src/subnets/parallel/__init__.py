"""Running on several processes: ``torchrun`` and data parallelism
([distributed][subnets.parallel.distributed]: ranks, barriers, broadcasts, gradient averaging) and FSDP2
sharding ([sharding][subnets.parallel.sharding]: sharded models, local masks, sharded checkpoints with
``torch.distributed.checkpoint``). Nothing is imported here."""
