"""RAM splitting: fit the arena that DECODE's outputs grow.

Splits layers into output-channel groups (`split`) and chooses per kernel
among compress, split and int8 for `max_decode_bytes` / `ram_bytes`
(`ram_budget`).
"""
