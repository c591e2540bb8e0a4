"""kvref: a small, exact reference implementation of the KV cache and its serving machinery."""
