"""Hub-code model families on transformers 5, natively.

Some hub repositories (InternLM2, Baichuan2, ChatGLM3, Qwen-1, MiniCPM...) ship their own modeling
and tokenizer code, written for transformers 4; on transformers 5 it no longer imports. lmtune loads
such a repository into transformers' own implementation of the same architecture instead:

- the weights load as the checkpoint stores them, through transformers' checkpoint conversion
  (renamings and reversible splits registered per port), and save back under the hub's names;
- the tokenizer is built by transformers' own backend from the repository's vocabulary files, with
  the original tokenizer's ids;
- an export writes the hub ``config.json`` and copies the repository's code files (``layout``).

``native_callable`` is how a config reaches them: importing this package registers it with
``lmtune.config.build`` (``route_calls``), which then asks it about every ``from_pretrained`` of
transformers' ``Auto*`` classes (``lmtune.model`` imports it, and so does every command that loads a
config), and a directory or hub id of a ported family
is loaded natively whether or not the config says ``trust_remote_code`` (no remote code runs).
Other repositories load exactly as transformers loads them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from lmtune.config.build import route_calls
from lmtune.core.errors import ConfigError
from lmtune.model.ports.family import BY_TYPE, FAMILIES, Family, family_of, family_of_tokenizer, native_titles

__all__ = [
    "FAMILIES", "BY_TYPE", "Family", "check_model_config", "check_runnable", "family_of", "hub_config",
    "implementation", "load_config", "load_model", "load_tokenizer", "native_callable", "native_target_modules",
    "native_titles", "save_tokenizer"]

# from_pretrained arguments that are about loading, not about the model's configuration
LOADING_KWARGS = {"dtype", "torch_dtype", "device_map", "quantization_config", "low_cpu_mem_usage",
                  "attn_implementation", "revision", "cache_dir", "token", "local_files_only", "subfolder",
                  "use_safetensors", "weights_only", "offload_folder", "offload_state_dict", "offload_buffers",
                  "max_memory", "key_mapping", "tp_plan", "tp_size", "device_mesh", "output_loading_info",
                  "force_download", "proxies", "variant", "adapter_kwargs", "adapter_name", "gguf_file",
                  "generation_config", "state_dict", "experts_implementation"}
HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "subfolder", "force_download", "proxies")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.json", "qwen.tiktoken", "vocab.json", "merges.txt")


def hub_config(path: Any, **kwargs: Any) -> dict | None:
    """The ``config.json`` of a local dir or hub id as a plain dict (no code runs), or None if there is
    none to read (no such dir, no network, not a model repository)."""
    if path is None or not isinstance(path, (str, Path)):
        return None
    local = Path(str(path)).expanduser()
    if local.is_dir():
        sub = kwargs.get("subfolder") or ""
        file = local / sub / "config.json"
        if not file.is_file():
            return None
        try:
            return json.loads(file.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ConfigError(f"{file} is not valid JSON: {exc}") from None
    try:
        from transformers import PretrainedConfig

        found, _ = PretrainedConfig.get_config_dict(str(path), **{k: kwargs[k] for k in HUB_KWARGS if k in kwargs})
    except (OSError, ValueError, TypeError):
        return None
    return found


def _json_file(path: Any, name: str, kwargs: dict) -> dict | None:
    """A JSON file of a local dir or hub repository, or None."""
    from lmtune.model.ports.layout import _local_file

    if path is None:
        return None
    found = _local_file(_source(path, kwargs), name)
    if found is None:
        return None
    try:
        return json.loads(found.read_text(encoding="utf-8"))
    except ValueError:
        return None


def _source(path: Any, kwargs: dict) -> str:
    sub = kwargs.get("subfolder")
    return str(Path(str(path)) / sub) if sub and Path(str(path)).is_dir() else str(path)


# ------------------------------------------------------------------ models and configs

def load_config(family: Family, hub: dict, path: Any, **overrides: Any) -> Any:
    """The native config of a ported repository, remembering its hub config for the hub-layout save."""
    merged = {**hub, **{k: v for k, v in overrides.items() if k not in LOADING_KWARGS and k != "trust_remote_code"}}
    config = family.code().native_config(merged)
    config.hub_layout = {"config": hub, "source": _source(path, overrides)}
    config._name_or_path = str(path)
    return config


def load_model(family: Family, hub: dict, path: Any, **kwargs: Any) -> Any:
    """``from_pretrained`` of a ported family: transformers' implementation, the hub's weights as stored."""
    kwargs.pop("trust_remote_code", None)
    kwargs.pop("config", None)
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k not in LOADING_KWARGS}
    config = load_config(family, hub, path, **overrides, **{k: kwargs[k] for k in ("subfolder",) if k in kwargs})
    return family.code().model_class(hub).from_pretrained(path, config=config, **kwargs)


def empty_model(family: Family, hub: dict, path: Any, **kwargs: Any) -> Any:
    """The model of a ported repository with its parameters on the meta device (nothing read)."""
    from accelerate import init_empty_weights

    attn = kwargs.pop("attn_implementation", None)
    config = load_config(family, hub, path, **kwargs)
    with init_empty_weights(include_buffers=False):
        return family.code().model_class(hub)._from_config(config, **({"attn_implementation": attn} if attn else {}))


def implementation(path: Any, trust_remote_code: bool = False, **kwargs: Any) -> str:
    """Which code will run the model at ``path``: a port, transformers' own class, or the hub's code."""
    hub = hub_config(path, **kwargs)
    family = family_of(hub)
    if family is not None:
        return f"lmtune port of {family.title}: {family.implementation}"
    if hub is None:
        return "unknown (no config.json could be read)"
    if hub.get("auto_map") and trust_remote_code:
        return f"the repository's own code (trust_remote_code=True; model_type {hub.get('model_type')!r})"
    return f"transformers' own class for model_type {hub.get('model_type')!r}"


def native_target_modules(model: Any, names: Any) -> Any:
    """LoRA ``target_modules`` written with a hub repository's layer names (``wqkv``, ``W_pack``...) in the
    port's names (``q_proj``, ``k_proj``, ``v_proj``...); anything else unchanged."""
    layout = getattr(getattr(model, "config", None), "hub_layout", None)
    if not layout or names is None or isinstance(names, str):
        return names
    hub = layout["config"]
    family = family_of(hub)
    table = getattr(family.code(), "HUB_LINEAR_NAMES", {}).get(hub.get("model_type"), {}) if family else {}
    out: list[str] = []
    for name in names:
        for native in table.get(name, (name,)):
            if native not in out:
                out.append(native)
    return out


# ------------------------------------------------------------------ tokenizers

def load_tokenizer(family: Family, hub: dict, path: Any, **kwargs: Any) -> Any:
    """The tokenizer of a ported repository without its remote code, with the original's ids."""
    kwargs.pop("trust_remote_code", None)
    custom = getattr(family.code(), "load_tokenizer", None)
    if custom is not None:
        tokenizer = custom(path, hub, **kwargs)
    else:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        tokenizer = TokenizersBackend.from_pretrained(path, **kwargs)
    tokenizer.hub_layout_source = _source(path, kwargs)
    return tokenizer


def llama_rule_tokenizer(path: Any, **kwargs: Any) -> Any:
    """The repository's tokenizer files through transformers' tokenizers backend, with the BOS/EOS rule of the
    Llama-style tokenizers the hub code names: BOS unless tokenizer_config.json says ``add_bos_token: false``,
    no EOS unless it says ``add_eos_token: true`` (the backend alone would add neither without the keys)."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    config = _json_file(path, "tokenizer_config.json", kwargs) or {}
    for name, default in (("add_bos_token", True), ("add_eos_token", False)):
        kwargs.setdefault(name, bool(config.get(name, default)))
    return TokenizersBackend.from_pretrained(path, **kwargs)


def save_tokenizer(tokenizer: Any, save_dir: str | Path) -> None:
    """Save a tokenizer; one loaded from a ported repository is saved as that repository's own files
    (its vocabulary, configs and tokenizer code), which both the hub code and lmtune read."""
    from lmtune.model.ports.layout import _local_file

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    source = getattr(tokenizer, "hub_layout_source", None)
    if source is None:
        tokenizer.save_pretrained(str(save_dir))
        return
    config = _local_file(source, "tokenizer_config.json")
    names = list(TOKENIZER_FILES)
    if config is not None:
        auto = json.loads(config.read_text(encoding="utf-8")).get("auto_map") or {}
        for ref in auto.values():
            for item in ref if isinstance(ref, (list, tuple)) else [ref]:
                if isinstance(item, str) and "--" not in item:
                    names.append(item.rsplit(".", 1)[0] + ".py")
    for name in dict.fromkeys(names):
        found = _local_file(source, name)
        if found is not None and found.resolve() != (save_dir / name).resolve():
            (save_dir / name).write_bytes(found.read_bytes())


# ------------------------------------------------------------------ families lmtune does not run

def check_runnable(path: Any, trust_remote_code: bool = False, **kwargs: Any) -> None:
    """Stop, in one sentence and before anything heavy, when ``path`` holds a model whose own (hub) code
    is needed and lmtune has no port of it: without ``trust_remote_code``, or when that code does not
    import on this transformers (hub code written for transformers 4 mostly does not)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    hub = hub_config(path, **kwargs)
    if hub is None or family_of(hub) is not None or not (hub.get("auto_map") or {}).get("AutoModelForCausalLM"):
        return
    kind = hub.get("model_type")
    if kind in CONFIG_MAPPING_NAMES and not trust_remote_code:
        return  # transformers has the architecture itself and uses it
    version = transformers.__version__
    ported = f"lmtune runs these hub-code families natively: {native_titles()}"
    if not trust_remote_code:
        raise ConfigError(f"{path} ships its own model code (model_type {kind!r}) and lmtune has no port of it; "
                          f"{ported}. To run the repository's code set trust_remote_code=True in the model dict "
                          f"(it must support transformers {version}), or use a checkpoint of an architecture that "
                          "transformers has")
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    reference = hub["auto_map"]["AutoModelForCausalLM"]
    try:
        get_class_from_dynamic_module(reference, str(path), **{k: kwargs[k] for k in HUB_KWARGS if k in kwargs})
    except Exception as exc:  # noqa: BLE001 - whatever the foreign code raises on import
        raise ConfigError(f"{path}: its own model code ({reference}, model_type {kind!r}) does not run on "
                          f"transformers {version} ({type(exc).__name__}: {exc}): it was written for an older "
                          f"transformers. {ported}; for another family use a checkpoint converted to an "
                          "architecture transformers has") from None


def check_model_config(model_cfg: Any) -> None:
    """``check_runnable`` for the ``llm`` of a config's ``model`` dict (``dict(type=AutoModel...from_pretrained,
    pretrained_model_name_or_path=..., trust_remote_code=...)``); other forms are left to build."""
    llm = model_cfg.get("llm") if isinstance(model_cfg, dict) else None
    if not isinstance(llm, dict) or _auto_kind(llm.get("type")) != "model":
        return
    kwargs = {k: v for k, v in llm.items() if k in HUB_KWARGS}
    check_runnable(llm.get("pretrained_model_name_or_path"), bool(llm.get("trust_remote_code", False)), **kwargs)


# ------------------------------------------------------------------ the config hook

def _auto_kind(fn: Any) -> str | None:
    """``'model'``, ``'tokenizer'`` or ``'config'`` for ``from_pretrained`` of transformers' Auto classes."""
    owner = getattr(fn, "__self__", None)
    if getattr(fn, "__name__", "") not in ("from_pretrained", "from_config") or not isinstance(owner, type):
        return None
    module = getattr(owner, "__module__", "") or ""
    name = owner.__name__
    if not module.startswith("transformers.") or not name.startswith("Auto"):
        return None
    if name == "AutoTokenizer":
        return "tokenizer"
    if name == "AutoConfig":
        return "config"
    return "model" if name.startswith("AutoModel") and fn.__name__ == "from_pretrained" else None


def native_callable(fn: Any, kwargs: dict) -> Any | None:
    """What to call instead of ``fn(**kwargs)`` when ``fn`` is an Auto class's ``from_pretrained`` of a
    repository lmtune runs natively; None otherwise (call ``fn`` as it is)."""
    kind = _auto_kind(fn)
    if kind is None:
        return None
    path = kwargs.get("pretrained_model_name_or_path")
    hub = hub_config(path, **kwargs)
    family = family_of(hub)
    if family is None and kind == "tokenizer":  # a tokenizer saved on its own: its config names the family
        family = family_of_tokenizer(_json_file(path, "tokenizer_config.json", kwargs))
        hub = hub or {}
    if family is None:
        return None
    owner = fn.__self__
    if kind == "model" and owner.__name__ not in ("AutoModelForCausalLM", "AutoModel"):
        return None  # sequence classification and the like: not ported; transformers decides
    loader = {"model": load_model, "tokenizer": load_tokenizer, "config": load_config}[kind]

    @functools.wraps(fn)
    def native(**call_kwargs: Any) -> Any:
        call_kwargs = dict(call_kwargs)
        target = call_kwargs.pop("pretrained_model_name_or_path")
        return loader(family, hub, target, **call_kwargs)

    return native


def from_pretrained(auto_cls: Any, path: Any, **kwargs: Any) -> Any:
    """``auto_cls.from_pretrained(path, **kwargs)``, through a port where lmtune has one."""
    native = native_callable(auto_cls.from_pretrained, {"pretrained_model_name_or_path": path, **kwargs})
    if native is not None:
        return native(pretrained_model_name_or_path=path, **kwargs)
    return auto_cls.from_pretrained(path, **kwargs)


route_calls(native_callable)  # lmtune.config.build asks the ports about every Auto*.from_pretrained it builds
