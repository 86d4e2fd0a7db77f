"""Downstream tasks, pre-training corpora, the synthetic knowledge world and corpus annotation."""
