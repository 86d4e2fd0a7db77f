"""Masking policies: every policy is a scorer; one sampler and one corruption function serve all."""
