"""A run as files: its [folder][subnets.runs.folder] (every path it writes, the lock), its
[identity][subnets.runs.identity] (the settings, data and model a folder holds, so that a resumed run is the
same run), its [checkpoint][subnets.runs.checkpoint] files and their [keys][subnets.runs.checkpoint_schema],
the results table ([results][subnets.runs.results]), and a trained run reused
([trained][subnets.runs.trained]: load, evaluate, predict; [trained_folder][subnets.runs.trained_folder]: its
config and checkpoints). Nothing is imported here."""
