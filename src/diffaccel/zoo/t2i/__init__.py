"""Text-to-image zoo: captioned shapes, a VAE, two text-conditioned denoisers (PixArt-alpha and SD style) as
standard diffusers pipelines, and an evaluator of prompt adherence. See docs/zoo-text-to-image.md."""
