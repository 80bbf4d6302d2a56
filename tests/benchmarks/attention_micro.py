"""Time one 768 px SD-1.5 self-attention: SDPA against chunked SDPA of several chunk shapes.

One call of batch 2 x 8 heads, 9216 tokens, head dim 40, float32, on the CPU; each contender
is run ``REPEATS`` times, interleaved, and compared with SDPA by median CPU and wall time.
Shapes: the shipped one (1024 query rows, then as many heads as fit), the first version's
(one head, all the rows that fit) and all heads with the rows that fit. Used for the chunk
shape table of docs/explanation/attention.md::

    python tests/benchmarks/attention_micro.py [TOKENS [REPEATS]]
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any


def main(argv: list[str]) -> int:
    """Run the contenders and print one line each."""
    import torch
    import torch.nn.functional as F  # noqa: N812 (torch's own spelling)

    import mps_helpers._attention as attention

    shipped = attention._chunk_shape
    balanced = attention._balanced

    def one_head(batch: int, heads: int, rows: int, keys: int, bound: int) -> Any:
        per_head = rows * keys
        if per_head <= bound:
            group, step = balanced(batch * heads, bound // per_head), rows
        else:
            group, step = 1, balanced(rows, bound // keys)
        if group >= heads:
            return balanced(batch, group // heads), heads, step
        return 1, balanced(heads, group), step

    def all_heads(batch: int, heads: int, rows: int, keys: int, bound: int) -> Any:
        return batch, heads, balanced(rows, bound // (batch * heads * keys))

    tokens = int(argv[0]) if argv else 9216
    repeats = int(argv[1]) if len(argv) > 1 else 3
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, tokens, 8, 40).transpose(1, 2) for _ in range(3))
    cases = {
        "sdpa": None,
        "shipped 2**24": (shipped, 24),
        "shipped 2**26": (shipped, 26),
        "shipped 2**27": (shipped, 27),
        "shipped 2**28": (shipped, 28),
        "one head 2**26": (one_head, 26),
        "all heads 2**26": (all_heads, 26),
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    reference = F.scaled_dot_product_attention(q, k, v)
    for _ in range(repeats):
        for name, case in cases.items():
            wall, cpu = time.perf_counter(), time.process_time()
            if case is None:
                out = F.scaled_dot_product_attention(q, k, v)
            else:
                attention._chunk_shape = case[0]
                out = attention._chunked_attention(
                    q, k, v, None, scale=40**-0.5, chunk_elements=2 ** case[1]
                )
            times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
            attention._chunk_shape = shipped
            assert (out - reference).abs().max() < 1e-5
    print(f"threads={torch.get_num_threads()} tokens={tokens} repeats={repeats}")
    base_cpu = statistics.median(t[0] for t in times["sdpa"])
    base_wall = statistics.median(t[1] for t in times["sdpa"])
    for name, measured in times.items():
        cpu = statistics.median(t[0] for t in measured)
        wall = statistics.median(t[1] for t in measured)
        print(
            f"{name:16s} CPU {cpu:6.2f} s ({cpu / base_cpu:.2f}x)"
            f"  wall {wall:6.2f} s ({wall / base_wall:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
