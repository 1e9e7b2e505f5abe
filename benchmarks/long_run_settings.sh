# The long run's settings, shared by benchmarks/long_run.sh and benchmarks/cooldown.sh (sourced, not run).
# The network (4 x 128) and optim.lr are pinned to those the long run has trained with since it began (2026-11-25),
# so that a change of the config's defaults (the recipe for new runs) does not change this run midway.
# benchmarks/gpu_run.py, which continues the same run, pins the same three.
LONG_RUN_SETTINGS=(trainer.max_time=null trainer.limit_val_batches=0.05 trainer.sample_every_n_epochs=0
                   trainer.ckpt_every_n_steps=500 trainer.keep_every_n_steps=2000
                   model.hidden=128 model.n_layers=4 optim.lr=5.0e-4)
