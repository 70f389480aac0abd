"""Training: the train state, the jitted step and the stage loop (train),
the data-parallel mesh (sharding) and the whole sweep of an experiment
(sweep). Checkpoints are tcr_jax/checkpoints.py.
"""
