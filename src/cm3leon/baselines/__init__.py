"""Baselines that CM3Leon is compared with on the same training data and budget
(`cm3leon ablate --baselines`, `cm3leon.run.baselines`).

- `ldm`: a Stable-Diffusion-style latent-diffusion model (Rombach et al. 2022) in the latent
  space of this project's image tokenizer, built from `diffusers` parts (the `[baselines]` extra).

The DALL-E-style autoregressive baseline needs no module of its own: it is the same
transformer trained left to right without CM3 spans or retrieval (`cm3leon.train.cli.pretrain`)."""
