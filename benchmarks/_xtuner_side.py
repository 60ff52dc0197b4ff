"""XTuner side of benchmarks/data_pipeline.py, run with the python of benchmarks/.venv-xtuner.

Times one call of ``xtuner.dataset.process_hf_dataset`` on the benchmark's JSON-lines file and
tokenizer, with XTuner's own ``alpaca_map_fn`` (plus the alpaca system prompt, which lmtune's adds)
and ``internlm2_chat`` template, passed as config dicts as an XTuner config passes them. Prints one
line ``BENCHMARK_RESULT {json}``. It imports no lmtune code (lmtune is not installed in that
environment). The parent sets HF_DATASETS_CACHE to a fresh directory and puts benchmarks/xtuner_stubs
on PYTHONPATH (see setup_xtuner_env.sh).
"""

from __future__ import annotations

import argparse
import json
import time


def packed_stats(dataset, max_length: int) -> dict:
    import pyarrow.compute as pc

    if getattr(dataset, "_indices", None) is not None:
        dataset = dataset.flatten_indices()
    table = dataset.data
    tokens = int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0)
    trained = int(pc.sum(pc.greater_equal(pc.list_flatten(table.column("labels")), 0)).as_py() or 0)
    rows = len(dataset)
    return {"packed_rows": rows, "tokens": tokens, "trained_tokens": trained,
            "fill_rate": tokens / max(rows * max_length, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe", default="")
    args = parser.parse_args()

    import numpy as np
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from xtuner.dataset import process_hf_dataset
    from xtuner.dataset.map_fns import alpaca_map_fn, template_map_fn_factory
    from xtuner.utils import PROMPT_TEMPLATE, SYSTEM_TEMPLATE

    def alpaca_with_system(example):
        # XTuner 0.2.0's alpaca_map_fn gives no system prompt; lmtune's gives SYSTEM_TEMPLATE.alpaca.
        # Add it here so that both sides tokenize the same text (the parent compares token counts).
        out = alpaca_map_fn(example)
        for turn in out["conversation"]:
            turn["system"] = SYSTEM_TEMPLATE.alpaca
        return out

    np.random.seed(args.seed)  # XTuner shuffles before packing with numpy's global generator
    t0 = time.perf_counter()
    dataset = process_hf_dataset(
        dataset=dict(type=load_dataset, path="json", data_files=dict(train=args.data)),
        tokenizer=dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=args.tokenizer,
                       trust_remote_code=True, padding_side="right"),
        max_length=args.max_length,
        dataset_map_fn=alpaca_with_system,
        template_map_fn=dict(type=template_map_fn_factory, template=PROMPT_TEMPLATE.internlm2_chat),
        remove_unused_columns=True,
        shuffle_before_pack=True,
        pack_to_max_length=True,
        map_num_proc=args.num_proc,
    )
    seconds = time.perf_counter() - t0

    from importlib.metadata import version

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    result = {"side": "xtuner", "num_proc": args.num_proc, "seconds": seconds,
              **packed_stats(dataset, args.max_length),
              "probe_ids": tokenizer.encode(args.probe, add_special_tokens=False) if args.probe else [],
              "versions": {name: version(name) for name in
                           ("xtuner", "torch", "transformers", "tokenizers", "datasets", "pyarrow")}}
    print("BENCHMARK_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
