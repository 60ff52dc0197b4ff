"""The checks of the tokenizer, the prompt template and the first rows of the data."""

from __future__ import annotations

import math
import re
from typing import Any

from lmtune.config.build import build, is_type_dict, resolve_callable
from lmtune.core.constants import IGNORE_INDEX
from lmtune.core.errors import ConfigError
from lmtune.tools.check.model import _model_cfg
from lmtune.tools.check.report import CheckReport, Writer

_MARKER = re.compile(r"<\|[^<>|\s]+\|>|</?[a-z][a-z0-9_]*>")


def _tokenizer_cfg(cfg: Any, ds_cfgs: list[dict]) -> Any:
    if cfg.get("tokenizer") is not None:
        return cfg["tokenizer"]
    for ds in ds_cfgs:
        if ds.get("tokenizer") is not None:
            return ds["tokenizer"]
    return _model_cfg(cfg).get("tokenizer")


def _single_token(tokenizer: Any, text: str) -> tuple[bool, int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    return (len(ids) == 1 and ids[0] != unk), len(ids)


def _template_of(cfg: Any, ds_cfgs: list[dict]) -> tuple[bool, Any]:
    """(whether a template is configured, the template: a name, a dict, or None for the chat template)."""
    for ds in ds_cfgs:
        fn = ds.get("template_map_fn")
        if is_type_dict(fn) and "template" in fn:
            return True, fn["template"]
        if fn is not None:
            return True, cfg.get("prompt_template")
    return False, None


def _check_template(report: CheckReport, w: Writer, cfg: Any, ds_cfgs: list[dict], tokenizer: Any) -> None:
    from lmtune.dataset.chat_template import has_chat_template, uses_chat_template
    from lmtune.dataset.templates import PROMPT_TEMPLATE, get_template

    configured, template = _template_of(cfg, ds_cfgs)
    if not configured:
        w.line("prompt template: none (rows are used as they are)")
        return
    if uses_chat_template(template):
        if has_chat_template(tokenizer):
            w.line("prompt template: the tokenizer's own chat template")
        else:
            report.problems.append("prompt_template is None/'auto' (the tokenizer's chat template), but the "
                                   "tokenizer has no chat_template: set prompt_template to a PROMPT_TEMPLATE entry")
        return
    try:
        tpl = get_template(template)
    except (KeyError, TypeError) as exc:
        report.problems.append(f"prompt template: {exc}")
        return
    name = template if isinstance(template, str) else next(
        (k for k, v in PROMPT_TEMPLATE.items() if dict(v) == dict(tpl)), "a custom template")
    stops = [str(s) for s in tpl.get("STOP_WORDS") or []]
    for hook in cfg.get("custom_hooks") or []:
        if isinstance(hook, dict):
            stops += [str(s) for s in (hook.get("stop_words") or []) if str(s) not in stops]
            if hook.get("stop_word") and str(hook["stop_word"]) not in stops:
                stops.append(str(hook["stop_word"]))
    w.line(f"prompt template: {name}; stop words: {', '.join(repr(s) for s in stops) or 'none'}")
    must = {s: "stop word" for s in stops}
    suffix = tpl.get("SUFFIX") or ""
    if tpl.get("SUFFIX_AS_EOS") and suffix and _MARKER.fullmatch(suffix.strip()):
        must.setdefault(suffix.strip(), "end-of-turn SUFFIX")
    for text, role in must.items():
        single, count = _single_token(tokenizer, text)
        if not single:
            report.problems.append(
                f"the prompt template's {role} {text!r} is not a single token of the tokenizer (it encodes to "
                f"{count} tokens): generation will not stop on it, and the template does not fit this model "
                "(pick the template of this model's family, or prompt_template=None for its chat template)")
    markers = sorted({m for key in ("SYSTEM", "INSTRUCTION", "SUFFIX", "SEP") for m in
                      _MARKER.findall(str(tpl.get(key) or ""))} - set(must))
    unknown = [m for m in markers if not _single_token(tokenizer, m)[0]]
    if unknown:
        report.notes.append(f"the template's markers {', '.join(map(repr, unknown))} are plain text for this "
                            "tokenizer (several tokens each); fine for a generic template, a mismatch if the model "
                            "was trained with them as special tokens")


def _data(report: CheckReport, w: Writer, ds_cfgs: list[dict], tokenizer: Any, rows: int,
          vocab: int | None, sample: bool = True) -> tuple[float | None, bool]:
    """Process the first ``rows`` rows of each dataset; the estimated number of rows they make. ``sample``: the
    first sample becomes the report's (the training data's; not a validation set's)."""
    from lmtune.dataset.huggingface import process_hf_dataset
    from lmtune.dataset.preference import build_preference_dataset
    from lmtune.dataset.stages import describe_source, train_split
    from lmtune.engine.hooks.chat import DatasetInfoHook

    total_est: float | None = 0.0
    exact = True
    for n, ds_cfg in enumerate(ds_cfgs):
        ds_cfg = dict(ds_cfg)
        fn = resolve_callable(ds_cfg.pop("type"), "train_dataset")
        if fn is build_preference_dataset:
            est = _pairs(report, w, n, ds_cfg, tokenizer, rows, vocab, sample)
            total_est = None if est is None or total_est is None else total_est + est[0]
            exact = exact and est is not None and est[1]
            continue
        if fn is not process_hf_dataset:
            report.notes.append(f"dataset {n} is built by {getattr(fn, '__name__', fn)}, not process_hf_dataset: "
                                "not sampled, so the number of steps is not estimated")
            total_est = None
            continue
        source = describe_source(ds_cfg.get("dataset"))
        try:
            raw = train_split(build(ds_cfg["dataset"], key="train_dataset.dataset"), ds_cfg.get("split", "train"))
        except ConfigError as exc:
            report.problems.append(f"dataset {source}: {exc}")
            total_est = None
            continue
        except Exception as exc:  # noqa: BLE001 - a missing file or hub dataset: reported as a problem
            report.problems.append(f"dataset {source} cannot be loaded: {type(exc).__name__}: {exc}")
            total_est = None
            continue
        all_rows = len(raw)
        effective = min(all_rows, int(ds_cfg.get("max_dataset_length") or all_rows))
        taken = min(rows, all_rows)
        subset = raw.select(range(taken))
        common = {**ds_cfg, "dataset": subset, "use_cache": False, "max_dataset_length": None, "split": "train"}
        common.pop("dataset_wait_timeout", None)
        try:
            samples = process_hf_dataset(**{**common, "pack_to_max_length": False})
        except ConfigError as exc:
            report.problems.append(f"dataset {source}: {exc}")
            total_est = None
            continue
        where = "the whole dataset" if taken == all_rows else f"the first {taken:,} of {all_rows:,} rows"
        w.line(f"dataset {n}: {source}: {where} processed")
        lengths = [len(ids) for ids in samples["input_ids"]]
        trained = sum(sum(1 for x in lab[1:] if x != IGNORE_INDEX) for lab in samples["labels"])
        tokens = sum(lengths)
        if lengths:
            w.line(f"  {len(lengths):,} samples kept of {taken:,} rows; mean {tokens / len(lengths):.1f} tokens, "
                   f"longest {max(lengths):,}; {100 * trained / max(tokens, 1):.1f}% of the tokens are trained")
        biggest = max((max(ids, default=-1) for ids in samples["input_ids"]), default=-1)
        if vocab is not None and biggest >= vocab:
            report.problems.append(f"dataset {source}: token id {biggest} is outside the model's embedding table "
                                   f"({vocab} rows): pass tokenizer=... to the model so that it resizes "
                                   "its embeddings, or use the model's own tokenizer")
        if sample and n == 0 and len(samples):
            report.sample_text = tokenizer.decode(samples[0]["input_ids"])
            report.sample_trained = DatasetInfoHook.render_labels(tokenizer, samples[0]["labels"])
        pack = ds_cfg.get("pack_to_max_length", True)
        max_length = ds_cfg.get("max_length")
        if pack and len(samples):
            packed = process_hf_dataset(**common)
            if taken == all_rows and effective == all_rows:
                est = float(len(packed))
                w.line(f"  packed into {len(packed):,} row(s) of up to {max_length} tokens")
            else:
                est = math.ceil(tokens / taken * effective / max_length)
                exact = False
                w.line(f"  packed into {len(packed):,} row(s) of up to {max_length} tokens; the whole dataset "
                       f"(~{effective:,} rows) makes ~{est:,} (estimate: its tokens / max_length)")
        else:
            est = len(samples) / max(taken, 1) * effective
            if taken < effective:
                exact = False
                w.line(f"  the whole dataset (~{effective:,} rows) makes ~{est:,.0f} training rows (estimate)")
        if total_est is not None:
            total_est += est
    return total_est, exact


def _pairs(report: CheckReport, w: Writer, n: int, ds_cfg: dict, tokenizer: Any, rows: int, vocab: int | None,
           sample: bool = True) -> tuple[float, bool] | None:
    """``_data`` for preference pairs: the first ``rows`` rows as training makes them; (estimated training rows,
    exact), or None when they cannot be made."""
    from lmtune.dataset.preference import build_preference_dataset
    from lmtune.dataset.stages import describe_source, train_split
    from lmtune.engine.hooks.chat import DatasetInfoHook

    source = describe_source(ds_cfg.get("dataset"))
    try:
        raw = train_split(build(ds_cfg["dataset"], key="train_dataset.dataset"), ds_cfg.get("split", "train"))
        taken = min(rows, len(raw))
        common = {**ds_cfg, "dataset": raw.select(range(taken)), "use_cache": False, "split": "train"}
        pairs = build_preference_dataset(**{**common, "use_varlen_attn": False})
    except ConfigError as exc:
        report.problems.append(f"dataset {source}: {exc}")
        return None
    except Exception as exc:  # noqa: BLE001 - a missing file or hub dataset: reported as a problem
        report.problems.append(f"dataset {source} cannot be loaded: {type(exc).__name__}: {exc}")
        return None
    where = "the whole dataset" if taken == len(raw) else f"the first {taken:,} of {len(raw):,} rows"
    w.line(f"dataset {n}: {source}: {where} processed (preference pairs)")
    lengths = [int(x) for x in pairs["length"]]
    w.line(f"  {len(lengths):,} pairs kept of {taken:,} rows; mean {sum(lengths) / max(len(lengths), 1):.1f} tokens "
           f"a pair (chosen + rejected), longest {max(lengths, default=0):,}")
    biggest = max((max(ids, default=-1) for ids in pairs["input_ids"]), default=-1)
    if vocab is not None and biggest >= vocab:
        report.problems.append(f"dataset {source}: token id {biggest} is outside the model's embedding table "
                               f"({vocab} rows): use the model's own tokenizer")
    if sample and n == 0 and len(pairs):
        row = pairs[0]
        chosen = row["num_tokens"][0]
        report.sample_text = (tokenizer.decode(row["input_ids"][:chosen]) + "\n[rejected]\n"
                              + tokenizer.decode(row["input_ids"][chosen:]))
        report.sample_trained = (DatasetInfoHook.render_labels(tokenizer, row["labels"][:chosen]) + "\n[rejected]\n"
                                 + DatasetInfoHook.render_labels(tokenizer, row["labels"][chosen:]))
    est, exact = float(len(pairs)) * len(raw) / max(taken, 1), taken == len(raw)
    if ds_cfg.get("use_varlen_attn") and len(pairs):
        packed = build_preference_dataset(**{**common, "use_varlen_attn": True})
        est = len(packed) * len(raw) / max(taken, 1)
        w.line(f"  packed into {len(packed):,} row(s) of up to {ds_cfg.get('max_packed_length', 16384)} tokens")
    if not exact:
        w.line(f"  the whole dataset (~{len(raw):,} rows) makes ~{est:,.0f} training rows (estimate)")
    return est, exact

