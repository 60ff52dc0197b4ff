"""One row far longer than ``max_length``: time and peak memory of encoding it, cut before tokenizing
(lmtune now) against tokenizing it whole (before, and what XTuner 0.2.0 does), in one run.

Each measurement runs in a subprocess of its own and reports the encoder call's wall time and the
process's peak resident memory (``ru_maxrss``) above what it held before the call. The tokenizer is the
byte-level BPE that ``lmtune.tools.tiny_model.train_bpe_tokenizer`` trains (8k vocab); the row is an
alpaca-style conversation whose input is ``--mb`` MB of generated words.

    python benchmarks/long_rows.py                      # 5 MB and 50 MB rows, max_length 128
    python benchmarks/long_rows.py --mb 50 --whole-mb 5 --max-length 2048

Tokenizing whole costs time in proportion to the row (``--whole-mb`` keeps that side short; its
figure is scaled to the cut side's row size and marked as such).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time


def _text(megabytes: float, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["the", "model", "learns", "from", "data", "tokens", "reward", "function", "上海", "naïve", "1234"]
    out, size = [], 0
    while size < megabytes * 1e6:
        word = rng.choice(words)
        out.append(word)
        size += len(word.encode()) + 1
    return " ".join(out)


def _measure(tokenizer_dir: str, megabytes: float, max_length: int, cut: bool) -> dict:
    from transformers import AutoTokenizer

    from lmtune.dataset.encode import ConversationEncoder

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    encoder = ConversationEncoder(tokenizer, max_length)
    if not cut:
        encoder.budget = None
    row = {"conversation": [{"input": _text(megabytes), "output": "Short."}]}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out = encoder(row)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "peak_mib": (peak - before) / 1024, "length": out["length"],
            "truncated": bool(out.get("truncated")), "budget_chars": encoder.budget}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=50.0, help="size of the row cut before tokenizing")
    parser.add_argument("--whole-mb", type=float, default=5.0, help="size of the row tokenized whole")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--child", nargs=4, metavar=("TOKENIZER", "MB", "MAX_LENGTH", "CUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        tokenizer_dir, mb, max_length, cut = args.child
        print(json.dumps(_measure(tokenizer_dir, float(mb), int(max_length), cut == "1")))
        return
    from lmtune.tools.tiny_model import train_bpe_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_bpe_tokenizer(_text(2.0, seed=1).split(". "), vocab_size=8000)
        tokenizer.save_pretrained(tmp)
        results = {}
        for label, mb, cut in (("cut", args.mb, True), ("whole", args.whole_mb, False)):
            done = subprocess.run([sys.executable, __file__, "--child", tmp, str(mb), str(args.max_length),
                                   "1" if cut else "0"], capture_output=True, text=True, check=True)
            results[label] = {**json.loads(done.stdout.strip().splitlines()[-1]), "mb": mb}
    cut, whole = results["cut"], results["whole"]
    scale = cut["mb"] / whole["mb"]
    print(f"max_length={args.max_length}")
    print(f"  cut before tokenizing: {cut['mb']:g} MB row in {cut['seconds']:.3f} s, peak +{cut['peak_mib']:.0f} MiB "
          f"(budget {cut['budget_chars']:,} characters)")
    print(f"  tokenized whole:       {whole['mb']:g} MB row in {whole['seconds']:.3f} s, peak +{whole['peak_mib']:.0f} "
          f"MiB; scaled to {cut['mb']:g} MB: {whole['seconds'] * scale:.1f} s")
    print(f"  speed-up at {cut['mb']:g} MB: {whole['seconds'] * scale / max(cut['seconds'], 1e-9):,.0f}x; "
          f"same sample length: {cut['length'] == whole['length']} ({cut['length']} tokens, truncated)")


if __name__ == "__main__":
    main()
