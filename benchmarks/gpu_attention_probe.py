#!/usr/bin/env python3
"""What a new sequence length costs each of torch's attention kernels on a GPU (CUDA only).

    python benchmarks/gpu_attention_probe.py            # JSON to results/gpu/attention_probe.json

One decoding step's attention, shaped as in a batch of 8 answers of a Qwen2.5-0.5B-sized model (14 heads of
64, one new query, keys with 3 padded positions masked out), run through ``scaled_dot_product_attention`` at 6
consecutive key lengths, twice each: the first call is what a new length costs, the second what it costs once
seen. For each dtype (bfloat16, float32) and each kernel choice: torch's own (``default``), and each kernel
alone (``cudnn``, ``efficient``, ``flash``, ``math``); a kernel that cannot take these inputs is recorded as
unavailable. Each choice gets key lengths of its own, so none profits from another's first calls; ``default``
runs first and also carries the process's first attention call.

Why: a generation meets a new key length at every step and with every new prompt width, so a kernel that
prepares itself per shape (cuDNN builds an execution graph) pays that again and again. The backend's answer
is the tier option ``cudnn_attention`` (off by default); ``benchmarks/transformers_throughput.py
--cudnn-attention off on`` measures what it changes end to end.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import RESULTS, machine_facts, rel, write_json  # noqa: E402

KERNELS = ("default", "cudnn", "efficient", "flash", "math")
LENGTHS = 6
FIRST_LENGTH = 300


def probe(torch: Any) -> list[dict[str, Any]]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"default": None, "cudnn": [SDPBackend.CUDNN_ATTENTION], "efficient": [SDPBackend.EFFICIENT_ATTENTION],
              "flash": [SDPBackend.FLASH_ATTENTION], "math": [SDPBackend.MATH]}
    rows = []
    base = FIRST_LENGTH
    for dtype in (torch.bfloat16, torch.float32):
        for name in KERNELS:
            for length in range(base, base + LENGTHS):
                q = torch.randn(8, 14, 1, 64, device="cuda", dtype=dtype)
                k = torch.randn(8, 14, length, 64, device="cuda", dtype=dtype)
                v = torch.randn(8, 14, length, 64, device="cuda", dtype=dtype)
                mask = torch.ones(8, 1, 1, length, dtype=torch.bool, device="cuda")
                mask[:, :, :, :3] = False
                ms: list[float | None] = []
                error = None
                for _ in range(2):  # a new length, then the same again
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    try:
                        if chosen[name] is None:
                            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                        else:
                            with sdpa_kernel(chosen[name]):
                                F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                        torch.cuda.synchronize()
                        ms.append(round((time.perf_counter() - t) * 1e3, 3))
                    except RuntimeError as exc:  # "No available kernel": this kernel cannot take these inputs
                        ms.append(None)
                        error = str(exc)[:80]
                rows.append({"dtype": str(dtype).removeprefix("torch."), "kernel": name, "key_length": length,
                             "first_ms": ms[0], "again_ms": ms[1], "error": error})
            base += 10
    return rows


def summary(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| dtype | kernel | first call at a new key length, ms | the same length again, ms |", "|---|---|---|---|"]
    for key in dict.fromkeys((r["dtype"], r["kernel"]) for r in rows):
        rs = [r for r in rows if (r["dtype"], r["kernel"]) == key]
        if any(r["first_ms"] is None or r["again_ms"] is None for r in rs):
            out.append(f"| {key[0]} | {key[1]} | unavailable | unavailable |")
            continue
        out.append(f"| {key[0]} | {key[1]} | {', '.join(str(r['first_ms']) for r in rs)} | "
                   f"{min(r['again_ms'] for r in rs)}-{max(r['again_ms'] for r in rs)} |")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu" / "attention_probe.json", help="JSON file")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_attention_probe: needs a CUDA device; torch {torch.__version__} sees none", file=sys.stderr)
        return 2
    rows = probe(torch)
    result = {"benchmark": "gpu_attention_probe", "machine": machine_facts(models=[]),
              "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
              "gpu": torch.cuda.get_device_name(0), "rows": rows}
    print("\n".join(summary(rows)))
    print(rel(write_json(args.out, result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
