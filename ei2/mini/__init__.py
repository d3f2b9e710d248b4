"""The miniature world: procedural scenes and clips (`world`), a scene parser with exact edit metrics (`parse`), and
the training of a tiny Stable Diffusion-layout text-to-image model on it (`pretrain`, saved under weights/mini).
See docs/mini.md."""
