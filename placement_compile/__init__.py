"""Diffusion macro placement (Lee et al., ICML 2025) and its compiler: see DESIGN.md."""
