"""ei2: EI² (Towards Consistent Video Editing with Text-to-Image Diffusion Models, NeurIPS 2023) in plain PyTorch."""

__version__ = "0.1.0"
