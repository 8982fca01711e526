"""Hand-written GPU kernels (Triton), each a torch custom op with the same math in torch for the CPU."""
