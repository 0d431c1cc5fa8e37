"""Shape buckets: every dynamic size is padded up to a power of two, so each program compiles once
per bucket and the compile count stays flat once the buckets in use have been seen."""


def bucket(n: int, minimum: int, maximum: int | None = None) -> int:
    size = max(minimum, 1 << max(n - 1, 0).bit_length())
    if maximum is not None and n > maximum:
        raise ValueError(f"{n} exceeds the largest bucket {maximum}")
    return size if maximum is None else min(size, maximum)


def all_buckets(minimum: int, maximum: int) -> list[int]:
    """Every size ``bucket(n, minimum, maximum)`` can give, smallest first: what a precompile covers."""
    return sorted({bucket(n, minimum, maximum) for n in range(1, maximum + 1)})
