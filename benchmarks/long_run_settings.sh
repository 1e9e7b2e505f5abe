# The long run's settings, shared by benchmarks/long_run.sh and benchmarks/cooldown.sh (sourced, not run).
# optim.lr is pinned to the rate the long run has trained at since it began (2026-11-25), so that a change of the
# config's default (the recipe for new runs) does not change this run midway.
LONG_RUN_SETTINGS=(trainer.max_time=null trainer.limit_val_batches=0.05 trainer.sample_every_n_epochs=0
                   trainer.ckpt_every_n_steps=500 trainer.keep_every_n_steps=2000 optim.lr=5.0e-4)
