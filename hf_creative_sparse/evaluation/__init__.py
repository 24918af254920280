"""Measuring: the quality functional Q (`quality`) and what it measures with (`lexical`,
`scorers`), the sparsity sweep (`sweep`) with its power-law fits (`power_laws`) and figure
(`plots`), and the attention benchmark (`attention_benchmark`)."""
