"""Diffusion process (:mod:`.vp`), noise schedules (:mod:`.schedules`) and samplers (:mod:`.samplers`)."""

#: Default of ``diffgen sample``: the fastest sampler / step count within the quality tolerance of the
#: 1000-step ancestral sampler, chosen by measurement (benchmarks/results/generation.md, "Default sampler").
#: Kept here, free of torch imports, so that the CLI can show it without loading torch.
DEFAULT_SAMPLER, DEFAULT_STEPS = "dpm2m-sde", 50
