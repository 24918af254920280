"""Measuring: the quality functional Q (`quality`), the sparsity sweep with its power-law
fits and plot (`sweep`) and the attention benchmark (`attention_benchmark`)."""
