"""The sampler loops and what they share, each fact once.

``guidance`` (condition encoding, the one classifier-free-guidance helper), ``grids`` (every timestep grid),
``seeds`` (seed derivation with named salts, per-sample noise), ``sde`` (online-RL rollouts with log-probabilities),
``sampler`` (the reward-gradient methods' DDIM / Euler sampler); ``npo`` puts a negative model on the unconditional
CFG branch of a stock diffusers pipeline. The transition kernels they step with are ``diffalign.diffusion.transition``.
"""
