"""The training recipe and its parts. [runner][subnets.training.runner] holds the recipe
([Run][subnets.training.runner.Run], [run][subnets.training.runner.run]): it checks the settings and builds a
run's parts ([assemble][subnets.training.assemble]), trains them with the step's shared update
([update][subnets.training.update]), calls the loop's [callbacks][subnets.training.callbacks] (validation, the
loss [guards][subnets.training.guards], checkpoints), keeps the step, best result, optimizer and method state
in a typed [TrainingState][subnets.training.state.TrainingState] that checkpoints and resumes, and logs to
metrics.jsonl and W&B ([tracking][subnets.training.tracking]). Nothing is imported here, so that the parts
low in the package (the update, the guards) import without the recipe."""
