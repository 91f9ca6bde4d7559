"""Helpers shared by the op launchers (kept free of a triton import, which not every platform has)."""


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for positive ints: the number of blocks of size b covering a (as ``triton.cdiv``)."""
    return (a + b - 1) // b
