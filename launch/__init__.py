"""How processes start: torchrun, SLURM (srun without torchrun), or one process."""
