"""How close is the tokenizer-free prompt count (``cascade.types.rough_token_count``) to a real tokenizer?

    python benchmarks/token_estimate.py [--tokenizer PATH_OR_CATALOG_ID ...] [--out results/token_estimate]

Tiers without a local tokenizer (hosted APIs) estimate a prompt's tokens without one, for cost budgets,
daily-spend holds and tokens-per-minute limits: the estimate should lean high, or those limits are overrun
by prompts it undercounts. This script counts a fixed set of texts (English prose and code from this
repository, a MMLU question file when the shared data is there: $CASCADE_SHARED_DATA, else
../shared/data; Finnish and German with long compounds, and text that is no words: random letters, random
12-letter words, hex, UUIDs, base64, JWT-like keys, all drawn with a fixed seed) with each local tokenizer
given (default: the catalog's Qwen2.5 and SmolLM2 ones, byte-level BPEs of 151k and 49k tokens) and writes
the ratio estimate / real per text:
``token_estimate.json``, ``token_estimate.md`` and ``token_estimate.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import string
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FINNISH = ("Tämä on esimerkkiteksti, jossa käytetään pitkiä yhdyssanoja kuten "
           "lentokonesuihkuturbiinimoottoriapumekaanikkoaliupseerioppilas ja järjestelmäasiantuntijakoulutusohjelma. "
           "Suomen kielessä sanat taipuvat monella tavalla, esimerkiksi talossa, talosta, taloon, talolla, talolta "
           "ja talolle. ")
GERMAN = ("Die Donaudampfschifffahrtsgesellschaftskapitänsmütze liegt neben dem "
          "Rindfleischetikettierungsüberwachungsaufgabenübertragungsgesetz. Wir besprechen die "
          "Arbeitsunfähigkeitsbescheinigung und die Geschwindigkeitsbegrenzung auf der Autobahn. ")


def sample_texts(data_dir: Path | None = None) -> dict[str, str]:
    """The texts counted, by name (deterministic: a fixed seed, files of this repository)."""
    rnd = random.Random(0)

    def random_bytes(n: int) -> bytes:
        return bytes(rnd.randrange(256) for _ in range(n))

    texts = {
        "english (README)": (REPO / "README.md").read_text(encoding="utf-8")[:20000],
        "python (engine.py)": (REPO / "cascade" / "engine.py").read_text(encoding="utf-8")[:20000],
        "finnish": FINNISH * 20,
        "german": GERMAN * 20,
        "random letters": "".join(rnd.choice(string.ascii_lowercase) for _ in range(3000)),
        "random 12-letter words": " ".join("".join(rnd.choice(string.ascii_lowercase) for _ in range(12))
                                           for _ in range(300)),
        "hex": "".join(rnd.choice("0123456789abcdef") for _ in range(3000)),
        "uuids": " ".join(uuid.UUID(int=rnd.getrandbits(128)).hex for _ in range(100)),
        "base64": base64.b64encode(random_bytes(3000)).decode(),
        "jwt-like keys": " ".join(base64.urlsafe_b64encode(random_bytes(60)).decode().rstrip("=") for _ in range(50)),
    }
    from benchmarks._common import shared_data_dir

    # the shared data folder every benchmark reads ($CASCADE_SHARED_DATA included): a checkout without
    # ../shared/data beside it otherwise lost the MMLU row without a word
    mmlu = shared_data_dir(data_dir) / "questions" / "mmlu" / "test"
    if mmlu.is_dir() and (files := sorted(mmlu.glob("*.csv"))):
        texts["mmlu questions"] = "\n".join(files[0].read_text(encoding="utf-8").splitlines()[:80])
    return texts


def measure(tokenizer: object, texts: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per text: the real count, the estimate, and estimate / real."""
    from cascade.types import rough_token_count

    out = {}
    for name, text in texts.items():
        real = len(tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
        est = rough_token_count(text)
        out[name] = {"real": real, "estimate": est, "ratio": round(est / real, 3)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", action="append", default=None,
                    help="a local model directory or catalog id (repeatable; default qwen2.5-coder-0.5b and "
                         "smollm2-135m)")
    ap.add_argument("--out", default=str(REPO / "results" / "token_estimate"))
    args = ap.parse_args(argv)
    from benchmarks._common import check_out

    check_out(ap, args.out, directory=True)  # before the tokenizers load, not after
    from transformers import AutoTokenizer

    from cascade.errors import CascadeError
    from cascade.models import resolve_model_path

    texts = sample_texts()
    started = time.perf_counter()
    results = {}
    for name in args.tokenizer or ["qwen2.5-coder-0.5b", "smollm2-135m"]:
        try:
            path = resolve_model_path(name)
        except CascadeError as exc:
            print(f"token_estimate: error: {exc}", file=sys.stderr)
            return 2
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a folder without (or with a broken) tokenizer
            print(f"token_estimate: error: --tokenizer {name}: no tokenizer could be loaded from {path}: "
                  f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}", file=sys.stderr)
            return 2
        results[name] = measure(tokenizer, texts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "token_estimate", "date": time.strftime("%Y-%m-%d"), "seconds": round(
        time.perf_counter() - started, 1), "texts": {k: len(v) for k, v in texts.items()}, "tokenizers": results}
    (out / "token_estimate.json").write_text(json.dumps(report, indent=2) + "\n")
    names = list(results)
    lines = ["# Tokenizer-free prompt estimate against real tokenizers", "",
             f"`python benchmarks/token_estimate.py` on {report['date']}: estimate / real count (above 1 leans "
             "high, as budgets need).", "",
             "| text | characters | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for text, chars in report["texts"].items():
        lines.append(f"| {text} | {chars:,} | " + " | ".join(f"{results[n][text]['ratio']:.2f}" for n in names)
                     + " |")
    (out / "token_estimate.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.bar([j + i * width for j in range(len(texts))], [results[n][t]["ratio"] for t in texts], width, label=n)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(texts))], list(texts), rotation=35, ha="right")
    ax.set_ylabel("estimate / real tokens")
    ax.set_title("rough_token_count against real tokenizers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "token_estimate.png", dpi=110)
    plt.close(fig)
    print("\n".join(lines))
    print(f"\nwrote {out}/token_estimate.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
