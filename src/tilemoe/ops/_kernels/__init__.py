"""@triton.jit kernels only, one concern per file; launched from tilemoe.ops."""
