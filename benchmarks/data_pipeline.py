"""Data-preparation benchmark: lmtune's process_hf_dataset against XTuner 0.2.0's, in one run.

What is timed, on each side, is one call of ``process_hf_dataset`` doing the whole preparation of an
alpaca-style JSON-lines file: loading it (``datasets.load_dataset('json')``), ``alpaca_map_fn``, the
``internlm2_chat`` template (ChatML), tokenization, dropping rows without targets, and packing to
``max_length`` (``pack_to_max_length=True``). Both sides get the same file, the same tokenizer
directory (``AutoTokenizer.from_pretrained``) and the same ``map_num_proc``, passed as config dicts
the way a config file passes them, so loading the tokenizer and the data is inside the timing on both
sides.

Measured for each ``map_num_proc``:

* lmtune cold: empty ``LMTUNE_CACHE``, empty Hugging Face datasets cache, ``use_cache=True``;
* lmtune cached: the same call again in the same process, and once more in a new process (what a
  second training run sees);
* XTuner cold: XTuner 0.2.0 in its own virtual environment (``setup_xtuner_env.sh``), empty Hugging
  Face datasets cache.

Each measurement runs in a subprocess of its own; only the call is timed (imports are not). The data
(rows with log-normal word counts, some ``<nooutput>``) and the tokenizer (byte-level BPE, 8k vocab,
trained with ``lmtune.tools.tiny_model.train_bpe_tokenizer``) are generated from ``--seed``.

    python benchmarks/data_pipeline.py                     # 100k rows, map_num_proc 1 and 2
    python benchmarks/data_pipeline.py --rows 20000 --num-proc 2
    python benchmarks/data_pipeline.py --profile           # also cProfile the lmtune cold run
    python benchmarks/data_pipeline.py --repeat 3          # medians of 3 interleaved cold runs per side

See benchmarks/README.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
XTUNER_SIDE = HERE / "_xtuner_side.py"
XTUNER_STUBS = HERE / "xtuner_stubs"
DEFAULT_XTUNER_PYTHON = HERE / ".venv-xtuner" / "bin" / "python"
RESULT_PREFIX = "BENCHMARK_RESULT "

# ----------------------------------------------------------------------------------------------
# Synthetic alpaca data
# ----------------------------------------------------------------------------------------------

_ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
           "st", "tr", "pr", "ch", "sh", "th", "br", "cl", "gr", "pl", "sp", "str"]
_NUCLEI = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "ou", "io", "oo", "y"]
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "rt", "ck", "ss", "ts", "nt"]
_FUNCTION_WORDS = ["the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "as", "with", "be",
                   "on", "not", "this", "are", "by", "or", "can", "from", "an", "which", "you", "your"]
_INSTRUCTION_OPENERS = ["Write", "Explain", "Describe", "Give", "List", "Summarize", "Classify",
                        "Translate", "Rewrite", "Generate", "Identify", "Compare", "Suggest", "Create"]


def _lexicon(rng: random.Random, size: int) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        syllables = 1 + min(int(rng.expovariate(0.9)), 4)
        words.add("".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)
                          for _ in range(syllables)))
    return _FUNCTION_WORDS + sorted(words)


class TextMaker:
    """Zipf-distributed pseudo-English: sentences of 4-25 words with punctuation and paragraphs."""

    def __init__(self, seed: int, lexicon_size: int = 20000) -> None:
        import numpy as np

        self.np = np
        self.rng = np.random.default_rng(seed)
        self.words = np.array(_lexicon(random.Random(seed), lexicon_size), dtype=object)
        ranks = np.arange(1, len(self.words) + 1, dtype=np.float64)
        weights = 1.0 / ranks ** 1.07
        self.cdf = np.cumsum(weights / weights.sum())

    def words_of(self, count: int) -> list[str]:
        picks = self.np.searchsorted(self.cdf, self.rng.random(count))
        return list(self.words[self.np.minimum(picks, len(self.words) - 1)])

    def text(self, count: int, paragraphs: bool = False) -> str:
        words = self.words_of(count)
        out: list[str] = []
        i = 0
        sentence = 0
        while i < count:
            n = int(self.rng.integers(4, 26))
            chunk = words[i:i + n]
            i += n
            chunk[0] = chunk[0].capitalize()
            if len(chunk) > 8 and self.rng.random() < 0.4:
                chunk[len(chunk) // 2] += ","
            end = "?" if self.rng.random() < 0.05 else "."
            sentence += 1
            if paragraphs and self.rng.random() < 0.12:
                out.append(f"\n\n{sentence}. " + " ".join(chunk) + end)
            else:
                out.append(" ".join(chunk) + end)
        return " ".join(out).strip()


def lognormal_words(rng, median: float, sigma: float, low: int, high: int) -> int:
    return int(min(max(round(rng.lognormal(math.log(median), sigma)), low), high))


def make_rows(n: int, seed: int) -> list[dict]:
    """Alpaca rows: instruction ~13 words, input in 40% of rows, output median 60 words with a long
    tail (up to 3000 words, a few rows longer than 2048 tokens), 2% ``<nooutput>``."""
    maker = TextMaker(seed)
    rng = maker.rng
    rows = []
    for _ in range(n):
        instruction = (str(rng.choice(_INSTRUCTION_OPENERS)) + " "
                       + maker.text(lognormal_words(rng, 11, 0.5, 2, 120)))
        inp = maker.text(lognormal_words(rng, 18, 0.9, 1, 800)) if rng.random() < 0.4 else ""
        if rng.random() < 0.02:
            output = "<nooutput>"
        else:
            output = maker.text(lognormal_words(rng, 60, 1.05, 1, 3000), paragraphs=True)
        rows.append({"instruction": instruction, "input": inp, "output": output})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def make_tokenizer(rows: list[dict], target: Path, vocab_size: int) -> None:
    """An 8k byte-level BPE tokenizer trained on the first rows, with a BOS, saved with ``save_pretrained``.

    transformers 5 writes ``tokenizer_class: TokenizersBackend`` and ``extra_special_tokens`` as a
    list, which transformers 4.48 (XTuner's side) cannot load; the config is rewritten in the older
    spelling (``PreTrainedTokenizerFast``, ``additional_special_tokens``), which both versions load to
    the same vocabulary and special tokens (the benchmark checks that both encode alike).
    """
    from tokenizers.processors import TemplateProcessing

    from lmtune.tools.tiny_model import train_bpe_tokenizer

    texts = [" ".join((r["instruction"], r["input"], r["output"])) for r in rows[:5000]]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=vocab_size)
    # A BOS token that the tokenizer prepends itself, as InternLM2's and Llama's do: XTuner's encode_fn
    # needs a BOS id for any tokenizer class but Qwen's, and lmtune adds one exactly when the
    # tokenizer does, so both sides put one BOS before every sample.
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    bos = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tokenizer.save_pretrained(str(target))
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("backend", "is_local", "local_files_only"):
        config.pop(key, None)
    if isinstance(config.get("extra_special_tokens"), list):  # 4.48 wants a dict there; both read this
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
    config_path.write_text(json.dumps(config, indent=2))


ALPACA_SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.")


def tokenizer_floor(rows: list[dict], tokenizer_dir: Path) -> dict:
    """Seconds the Rust tokenizer alone needs for the rows' ChatML prompt and answer texts.

    The same texts both pipelines tokenize (system prompt, instruction and input in the user turn,
    the answer with ``<|im_end|>``), one ``backend_tokenizer.encode`` per text in this process: the
    part of the work neither pipeline can avoid, whatever it does around it.
    """
    from transformers import AutoTokenizer

    backend = AutoTokenizer.from_pretrained(str(tokenizer_dir)).backend_tokenizer
    texts = []
    for r in rows:
        if r["output"].strip() == "<nooutput>":
            continue
        user = r["instruction"] + ("\n" + r["input"].strip() if r["input"].strip() else "")
        texts.append(f"<|im_start|>system\n{ALPACA_SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                     "<|im_start|>assistant\n")
        texts.append(r["output"] + "<|im_end|>")
    t0 = time.perf_counter()
    tokens = sum(len(backend.encode(text, add_special_tokens=False).ids) for text in texts)
    return {"rows": len(rows), "seconds": time.perf_counter() - t0, "tokens": tokens}


# ----------------------------------------------------------------------------------------------
# lmtune side (this file run with --worker lmtune, in lmtune's environment)
# ----------------------------------------------------------------------------------------------

def packed_stats(dataset, max_length: int) -> dict:
    """Packed rows, non-pad tokens, trained tokens and fill rate, read from Arrow (same code as
    _xtuner_side.py; the packed rows of both sides hold no padding, so every token counts)."""
    import pyarrow.compute as pc

    if getattr(dataset, "_indices", None) is not None:
        dataset = dataset.flatten_indices()
    table = dataset.data
    tokens = int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0)
    trained = int(pc.sum(pc.greater_equal(pc.list_flatten(table.column("labels")), 0)).as_py() or 0)
    rows = len(dataset)
    stats = {"packed_rows": rows, "tokens": tokens, "trained_tokens": trained,
             "fill_rate": tokens / max(rows * max_length, 1)}
    if "num_tokens" in table.column_names:  # lmtune: the lengths of the samples in each packed row
        import numpy as np

        lengths = np.asarray(pc.list_flatten(table.column("num_tokens")).to_numpy(zero_copy_only=False))
        stats["sample_tokens"] = {"samples": int(lengths.size), "mean": float(lengths.mean()),
                                  "p50": float(np.percentile(lengths, 50)), "p90": float(np.percentile(lengths, 90)),
                                  "p99": float(np.percentile(lengths, 99)), "max": int(lengths.max()),
                                  "at_max_length": int((lengths >= max_length).sum())}
    return stats


def lmtune_worker(args: argparse.Namespace) -> None:
    import logging

    from datasets import load_dataset
    from transformers import AutoTokenizer

    from lmtune.dataset import process_hf_dataset
    from lmtune.dataset.map_fns import alpaca_map_fn, template_map_fn_factory
    from lmtune.dataset.templates import PROMPT_TEMPLATE

    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("lmtune")
    logger.setLevel(logging.INFO)
    logger.addHandler(Keep())

    def call():
        return process_hf_dataset(
            dataset=dict(type=load_dataset, path="json", data_files=dict(train=args.data)),
            tokenizer=dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=args.tokenizer,
                           trust_remote_code=True, padding_side="right"),
            max_length=args.max_length,
            dataset_map_fn=alpaca_map_fn,
            template_map_fn=dict(type=template_map_fn_factory, template=PROMPT_TEMPLATE.internlm2_chat),
            remove_unused_columns=True,
            shuffle_before_pack=True,
            pack_to_max_length=True,
            map_num_proc=args.num_proc,
            seed=args.seed,
            use_cache=True,
        )

    seconds = []
    dataset = None
    for index in range(args.calls):
        profiler = None
        if args.profile and index == 0:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        t0 = time.perf_counter()
        dataset = call()
        seconds.append(time.perf_counter() - t0)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)

    from importlib.metadata import version

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    result = {"side": "lmtune", "num_proc": args.num_proc, "seconds": seconds,
              **packed_stats(dataset, args.max_length),
              "log": [m for m in messages if m.startswith(("Dataset", "Loaded"))],
              "probe_ids": tokenizer.encode(args.probe, add_special_tokens=False) if args.probe else [],
              "versions": {name: version(name) for name in
                           ("lmtune", "torch", "transformers", "tokenizers", "datasets", "pyarrow")}}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------

PROBE = "<|im_start|>user\nWrite the bealing of strouss, 12 times.<|im_end|>\n<|im_start|>assistant\n"


def run_side(name: str, command: list[str], env: dict, log_path: Path, timeout: float) -> dict:
    """Run one measurement in its own process; its output goes to ``log_path``."""
    print(f"  {name} ...", end="", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        log_path.write_text((exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes)
                            else (exc.stdout or ""))
        print(f" timed out after {timeout:.0f}s")
        return {"error": f"timed out after {timeout:.0f}s"}
    log_path.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
            shown = result["seconds"] if isinstance(result["seconds"], list) else [result["seconds"]]
            print(" " + ", ".join(f"{s:.2f}s" for s in shown) + f"  (process {time.perf_counter() - t0:.1f}s)")
            return result
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    print(f" failed (exit {proc.returncode}); see {log_path}")
    return {"error": f"exit {proc.returncode}: {tail}"}


def _spin(seconds_out) -> None:
    t0 = time.perf_counter()
    x = 0
    for i in range(15_000_000):
        x += i
    seconds_out.put(time.perf_counter() - t0)


def cpu_probe() -> dict:
    """How many cores' worth of CPU this machine gives right now: the same busy loop run alone, then
    in two processes at once. On a shared machine the second core may be partly taken by others,
    which is what makes map_num_proc=2 figures vary from run to run."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    results = ctx.Queue()

    def run(n: int) -> float:
        procs = [ctx.Process(target=_spin, args=(results,)) for _ in range(n)]
        for p in procs:
            p.start()
        times = [results.get() for _ in procs]
        for p in procs:
            p.join()
        return max(times)

    alone = run(1)
    together = run(2)
    return {"alone_s": alone, "two_at_once_s": together, "effective_cores": round(2 * alone / together, 2),
            "loadavg_1min": round(os.getloadavg()[0], 2)}


def lmtune_tree() -> dict:
    """Which lmtune was measured: the commit, and a digest of uncommitted changes under lmtune/."""
    import hashlib

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    diff = git("diff", "HEAD", "--", "lmtune")
    untracked = git("ls-files", "--others", "--exclude-standard", "--", "lmtune").split()
    digest = hashlib.sha256(diff.encode())
    for name in sorted(untracked):
        digest.update(name.encode() + (REPO / name).read_bytes())
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "modified": bool(diff or untracked),
            "changes_sha256": digest.hexdigest()[:12] if diff or untracked else None}


def base_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LMTUNE_", "PYTHONPATH"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", **extra)
    return env


def print_profile(path: Path, limit: int = 25) -> str:
    import io
    import pstats

    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats(limit)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="rows to generate (default 100000)")
    parser.add_argument("--num-proc", default="1,2", help="map_num_proc values, comma-separated (default 1,2)")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--xtuner-python", default=str(DEFAULT_XTUNER_PYTHON),
                        help="python of the XTuner environment (setup_xtuner_env.sh creates it)")
    parser.add_argument("--skip-xtuner", action="store_true", help="measure lmtune only")
    parser.add_argument("--profile", action="store_true",
                        help="also run lmtune cold once more under cProfile, on the first --profile-rows rows, "
                             "with map_num_proc=None (datasets runs map in the calling process only then)")
    parser.add_argument("--profile-rows", type=int, default=20_000)
    parser.add_argument("--profile-only", action="store_true", help="only the cProfile run (implies --profile)")
    parser.add_argument("--work-dir", help="keep data, caches and logs here (default: a temporary dir, removed)")
    parser.add_argument("--out", help="write all results as JSON here")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measured process")
    parser.add_argument("--repeat", type=int, default=1,
                        help="cold runs per side and map_num_proc, interleaved lmtune/XTuner; the table shows "
                             "the median (for shared, noisy machines)")
    parser.add_argument("--floor-rows", type=int, default=20_000,
                        help="rows on which to time the tokenizer alone (0: skip)")
    parser.add_argument("--worker", choices=["lmtune"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--probe", default="", help=argparse.SUPPRESS)
    parser.add_argument("--profile-out", dest="profile_path", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker == "lmtune":
        args.profile = args.profile_path
        args.num_proc = int(args.num_proc) or None  # 0: in this process (datasets' num_proc=None)
        lmtune_worker(args)
        return 0

    num_procs = [int(x) for x in args.num_proc.split(",") if x.strip()]
    if args.profile_only:
        args.profile, num_procs = True, []
        args.rows = min(args.rows, args.profile_rows)
    keep = args.work_dir is not None
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lmtune-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    xtuner_python = Path(args.xtuner_python)
    run_xtuner = not args.skip_xtuner
    xtuner_note = None
    if run_xtuner and not xtuner_python.exists():
        run_xtuner = False
        xtuner_note = f"{xtuner_python} not found: run bash benchmarks/setup_xtuner_env.sh first"
        print(f"XTuner side skipped: {xtuner_note}")

    print(f"Generating {args.rows} rows (seed {args.seed}) and an {args.vocab_size}-token BPE tokenizer in {work}")
    t0 = time.perf_counter()
    rows = make_rows(args.rows, args.seed)
    data = work / "alpaca.jsonl"
    write_jsonl(rows, data)
    tokenizer_dir = work / "tokenizer"
    if tokenizer_dir.exists():
        shutil.rmtree(tokenizer_dir)
    make_tokenizer(rows, tokenizer_dir, args.vocab_size)
    profile_data = None
    if args.profile:
        profile_data = work / "alpaca_profile.jsonl"
        write_jsonl(rows[: args.profile_rows], profile_data)
    floor = None
    if args.floor_rows and num_procs:
        floor = tokenizer_floor(rows[: args.floor_rows], tokenizer_dir)
        print(f"  tokenizer alone: {floor['tokens']:,} tokens of {floor['rows']} rows in {floor['seconds']:.1f}s "
              f"({floor['rows'] / floor['seconds']:,.0f} rows/s, {floor['tokens'] / floor['seconds']:,.0f} tokens/s)")
    words = [sum(len(r[k].split()) for r in rows) / max(len(rows), 1) for k in ("instruction", "input", "output")]
    nooutput = sum(r["output"] == "<nooutput>" for r in rows)
    del rows
    print(f"  done in {time.perf_counter() - t0:.1f}s; mean words instruction/input/output "
          f"{words[0]:.1f}/{words[1]:.1f}/{words[2]:.1f}, {nooutput} <nooutput> rows")

    common = ["--data", str(data), "--tokenizer", str(tokenizer_dir), "--max-length", str(args.max_length),
              "--seed", str(args.seed), "--probe", PROBE]
    me = [sys.executable, str(Path(__file__).resolve()), "--worker", "lmtune"]
    results: dict = {"rows": args.rows, "max_length": args.max_length, "vocab_size": args.vocab_size,
                     "seed": args.seed, "cpus": os.cpu_count(), "python": platform.python_version(),
                     "machine": platform.platform(), "mean_words": words, "nooutput_rows": nooutput,
                     "tokenizer_floor": floor, "lmtune_tree": lmtune_tree(), "runs": {},
                     "started": time.strftime("%Y-%m-%d %H:%M:%S"), "xtuner_note": xtuner_note}
    for n in num_procs:
        print(f"map_num_proc={n}")
        run_dir = work / f"np{n}"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir()
        entry: dict = {"cpu": cpu_probe(), "lmtune_cold_s": [], "xtuner_cold_s": []}
        print(f"  CPU probe: {entry['cpu']['effective_cores']} cores' worth of CPU free for two processes, "
              f"load average {entry['cpu']['loadavg_1min']}")
        for rep in range(args.repeat):
            tag = f"np{n}" + (f"_r{rep}" if args.repeat > 1 else "")
            rep_dir = run_dir / f"r{rep}"
            lm_env = base_env(LMTUNE_CACHE=str(rep_dir / "lmtune_cache"), HF_DATASETS_CACHE=str(rep_dir / "hf_lmtune"))
            first = rep == 0
            lm = run_side("lmtune cold + cached (same process)" if first else f"lmtune cold (repeat {rep + 1})",
                          me + common + ["--num-proc", str(n), "--calls", "2" if first else "1"], lm_env,
                          logs / f"lmtune_{tag}.log", args.timeout)
            if first:
                entry["lmtune"] = lm
                entry["lmtune_new_process"] = run_side(
                    "lmtune cached (new process)", me + common + ["--num-proc", str(n), "--calls", "1"], lm_env,
                    logs / f"lmtune_cached_{tag}.log", args.timeout)
            if "error" not in lm:
                entry["lmtune_cold_s"].append(lm["seconds"][0])
            if run_xtuner:
                xt_env = base_env(HF_DATASETS_CACHE=str(rep_dir / "hf_xtuner"), PYTHONPATH=str(XTUNER_STUBS))
                xt = run_side("XTuner 0.2.0 cold" + ("" if first else f" (repeat {rep + 1})"),
                              [str(xtuner_python), str(XTUNER_SIDE)] + common + ["--num-proc", str(n)], xt_env,
                              logs / f"xtuner_{tag}.log", args.timeout)
                if first:
                    entry["xtuner"] = xt
                if "error" not in xt:
                    entry["xtuner_cold_s"].append(xt["seconds"])
            shutil.rmtree(rep_dir / "hf_lmtune", ignore_errors=True)  # keep the disk use of repeats bounded
            shutil.rmtree(rep_dir / "hf_xtuner", ignore_errors=True)
        results["runs"][str(n)] = entry

    if args.profile:
        print(f"Profiling lmtune cold on {args.profile_rows} rows, map_num_proc=None")
        prof_dir = work / "profile"
        if prof_dir.exists():
            shutil.rmtree(prof_dir)
        prof_dir.mkdir()
        prof_path = prof_dir / "lmtune_cold.pstats"
        env = base_env(LMTUNE_CACHE=str(prof_dir / "lmtune_cache"), HF_DATASETS_CACHE=str(prof_dir / "hf"))
        prof_cmd = me + ["--data", str(profile_data), "--tokenizer", str(tokenizer_dir), "--max-length",
                         str(args.max_length), "--seed", str(args.seed), "--num-proc", "0", "--calls", "1",
                         "--profile-out", str(prof_path)]
        prof = run_side("lmtune cold under cProfile", prof_cmd, env, logs / "lmtune_profile.log", args.timeout)
        if "error" not in prof:
            text = print_profile(prof_path)
            (logs / "lmtune_profile.txt").write_text(text)
            results["profile"] = {"rows": args.profile_rows, "seconds": prof["seconds"][0],
                                  "report": str(logs / "lmtune_profile.txt")}
            print(text)

    report = render(results)
    print()
    print(report)
    results["report"] = report
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"Results written to {args.out}")
    if keep:
        print(f"Data, caches and logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def render(results: dict) -> str:
    """The markdown table of docs/benchmarks.md."""
    rows = results["rows"]
    tree = results.get("lmtune_tree") or {}
    measured = f"lmtune {tree.get('commit', '?')}" + (
        f" with uncommitted changes {tree['changes_sha256']}" if tree.get("modified") else "")
    lines = [f"{rows} rows, max_length {results['max_length']}, {results['cpus']} CPUs, {measured}",
             "",
             "| map_num_proc | run | seconds | rows/s | packed rows | tokens | fill rate |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    notes = []

    def row(n, name, seconds, stats):
        rate = rows / seconds if seconds else float("nan")
        lines.append(f"| {n} | {name} | {seconds:.2f} | {rate:,.0f} | {stats.get('packed_rows', 0):,} | "
                     f"{stats.get('tokens', 0):,} | {100 * stats.get('fill_rate', 0):.2f}% |")

    floor = results.get("tokenizer_floor")
    if floor:
        rate = floor["rows"] / floor["seconds"]
        lines.append(f"| - | tokenizer alone ({floor['rows']} rows, 1 process) | {rows / rate:.2f} (scaled) | "
                     f"{rate:,.0f} | - | - | - |")
        notes.append(f"tokenizer alone: {floor['tokens'] / floor['seconds']:,.0f} tokens/s; the {rows} rows "
                     f"need about {rows / rate:.0f}s of it on either side")
    for n, entry in results["runs"].items():
        lm, lm2, xt = entry.get("lmtune", {}), entry.get("lmtune_new_process", {}), entry.get("xtuner")
        if entry.get("cpu") and n != "1":
            notes.append(f"map_num_proc={n}: CPU probe before the runs: {entry['cpu']['effective_cores']} cores' worth "
                         f"of CPU for two processes (2.0 on an idle 2-core machine)")
        lm_cold = entry.get("lmtune_cold_s") or ([] if "error" in lm else [lm["seconds"][0]])
        xt_cold = entry.get("xtuner_cold_s") or ([] if xt is None or "error" in xt else [xt["seconds"]])
        if len(lm_cold) > 1 or len(xt_cold) > 1:
            pairs = [x / m for m, x in zip(lm_cold, xt_cold)]
            notes.append(f"map_num_proc={n}: cold runs (median in the table): lmtune "
                         + ", ".join(f"{v:.1f}" for v in lm_cold) + "s; XTuner "
                         + ", ".join(f"{v:.1f}" for v in xt_cold) + "s; ratio per interleaved pair "
                         + ", ".join(f"{v:.2f}x" for v in pairs))
        if "error" in lm:
            notes.append(f"map_num_proc={n}: lmtune failed: {lm['error']}")
        else:
            row(n, "lmtune cold", statistics.median(lm_cold), lm)
            if len(lm["seconds"]) > 1:
                row(n, "lmtune cached, same process", lm["seconds"][1], lm)
        if lm2 and "error" not in lm2:
            row(n, "lmtune cached, new process", lm2["seconds"][0], lm2)
        if xt is not None:
            if "error" in xt:
                notes.append(f"map_num_proc={n}: XTuner failed: {xt['error']}")
            else:
                row(n, "XTuner 0.2.0 cold", statistics.median(xt_cold), xt)
                if "error" not in lm:
                    ratio = statistics.median(xt_cold) / statistics.median(lm_cold)
                    notes.append(f"map_num_proc={n}: lmtune cold / XTuner cold throughput = {ratio:.2f}x; "
                                 f"tokens lmtune {lm['tokens']:,} vs XTuner {xt['tokens']:,}")
                    if lm.get("probe_ids") != xt.get("probe_ids"):
                        notes.append(f"map_num_proc={n}: WARNING: the two sides tokenize the probe differently")
    for entry in results["runs"].values():
        sample = entry.get("lmtune", {}).get("sample_tokens")
        if sample:
            notes.append(f"samples after map/template/tokenize (lmtune): {sample['samples']:,}, tokens per sample "
                         f"mean {sample['mean']:.0f}, p50 {sample['p50']:.0f}, p90 {sample['p90']:.0f}, "
                         f"p99 {sample['p99']:.0f}, max {sample['max']} ({sample['at_max_length']} truncated "
                         f"to max_length)")
            break
    if results.get("xtuner_note"):
        notes.append(f"XTuner not run: {results['xtuner_note']}")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


if __name__ == "__main__":
    sys.exit(main())
