"""Host time of ``pick_config`` (CPU only): a T with its own table entry, one the nearest entry stands in for, and an
fp16 layer on the bf16 entries; remembered per device table against one scan of the table (``table_entry_key``).

    python3 bench/pick_config_timing.py
"""

import timeit

import torch

import tilemoe.tuning as tuning
from tilemoe.tuning import MoEShape, pick_config, shape_key, table_entry_key

DEVICE = "NVIDIA H100 80GB HBM3"
POINTS = [
    ("T=4096 bf16, its own bucket", 4096, torch.bfloat16),
    ("T=8192 bf16, the nearest entry", 8192, torch.bfloat16),
    ("T=4096 fp16, the bf16 entry", 4096, torch.float16),
]


def main() -> None:
    table = tuning._load_table(DEVICE)
    for label, num_tokens, dtype in POINTS:
        shape = MoEShape(num_tokens, 128, 8, 2048, 768)  # qwen3-30b-a3b's layer
        key = shape_key(shape, dtype)
        pick_config(shape, dtype, DEVICE)  # the first call looks it up
        picked = timeit.timeit(lambda s=shape, d=dtype: pick_config(s, d, DEVICE), number=20000) / 20000
        scan = timeit.timeit(lambda k=key, t=num_tokens: table_entry_key(table, k, t), number=2000) / 2000
        print(f"{label}: pick_config {picked * 1e6:.1f} us remembered; table_entry_key scan {scan * 1e6:.1f} us")


if __name__ == "__main__":
    main()
