"""Samplers as pure functions over a denoiser, noise schedules, and guidance."""
