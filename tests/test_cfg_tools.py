"""lmtune list-cfg / copy-cfg, and model_resource (download the model before anything is built)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lmtune
from lmtune.config import Config, ConfigError, build
from lmtune.config.model_resource import apply_model_resource
from lmtune.configs import library
from lmtune.tools import cfg_tools

REF_NAME = "internlm2_chat_7b_qlora_oasst1_e3"
SEED_CFG = Path(lmtune.__file__).parent / "configs" / "internlm" / f"{REF_NAME}.py"
PRESETS = ["deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3",
           "deepspeed_zero3_offload"]


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lmtune")
    cfg_tools.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.func(args)


# ------------------------------------------------------------------ list-cfg / copy-cfg

def test_list_cfg_shows_configs_by_family_and_the_deepspeed_presets(capsys):
    assert _cli("list-cfg") == 0
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.splitlines()]
    assert REF_NAME in lines and "demo" in lines
    assert "internlm/" in lines  # grouped by the family directory
    assert lines.index("internlm/") < lines.index(REF_NAME)
    assert lines.index("qwen/qwen2_5_7b_instruct/") < lines.index("qwen2_5_7b_instruct_lora_alpaca_e3")  # rendered
    for preset in PRESETS:
        assert preset in lines
    assert not any(line.endswith((".py", ".json")) for line in lines)


def test_list_cfg_filters_by_substring_and_glob(capsys):
    assert _cli("list-cfg", "-p", "QLoRA") == 0  # case-insensitive substring
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert REF_NAME in lines and "demo" not in lines and not any(p in lines for p in PRESETS)

    assert _cli("list-cfg", "--pattern", "*zero3*") == 0  # glob
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert {"deepspeed_zero3", "deepspeed_zero3_offload"} <= set(lines)
    assert "deepspeed_zero2" not in lines and REF_NAME not in lines

    assert _cli("list-cfg", "-p", "zero") == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert set(PRESETS) <= set(lines) and REF_NAME not in lines

    assert _cli("list-cfg", "-p", "no-such-thing") == 0
    assert "no built-in config" in capsys.readouterr().out


def test_copy_cfg_copies_into_a_new_dir_and_prints_where(tmp_path, capsys):
    dest = tmp_path / "a" / "b"
    assert _cli("copy-cfg", REF_NAME, str(dest)) == 0
    target = dest / f"{REF_NAME}.py"
    assert target.read_bytes() == SEED_CFG.read_bytes()
    assert str(target) in capsys.readouterr().out
    # the copy is a working config
    cfg = Config.fromfile(target)
    assert cfg.max_length == 2048 and cfg.model.lora.r == 64

    # a library config that exists only as the renderer's output: the copy is its rendered text, as a file
    name = "qwen2_5_7b_instruct_lora_alpaca_e3"
    assert not (Path(lmtune.__file__).parent / "configs" / library.relative_path(name)).exists()
    assert _cli("copy-cfg", name, str(dest)) == 0
    assert (dest / f"{name}.py").read_text() == library.render_named(name)
    assert Config.fromfile(dest / f"{name}.py").pretrained_model_name_or_path == "Qwen/Qwen2.5-7B-Instruct"

    assert _cli("copy-cfg", "deepspeed_zero2", str(dest)) == 0  # presets too
    assert json.loads((dest / "deepspeed_zero2.json").read_text())["zero_optimization"]["stage"] == 2


def test_copy_cfg_refuses_to_overwrite(tmp_path):
    target = tmp_path / f"{REF_NAME}.py"
    target.write_text("# my edits\n")
    with pytest.raises(ConfigError, match="already exists"):
        _cli("copy-cfg", REF_NAME, str(tmp_path))
    assert target.read_text() == "# my edits\n"


def test_copy_cfg_unknown_name_suggests_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match=f"did you mean '{REF_NAME}'"):
        _cli("copy-cfg", "internlm2_chat_7b_qlora_oasst_e3", str(tmp_path))
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------ model_resource

CALLS: list[dict] = []


def fake_download(model_id: str, src: str, cache_dir: str) -> str:
    """A stand-in for modelscope/openMind snapshot_download: copies ``src`` into a cache dir once."""
    CALLS.append({"model_id": model_id})
    target = Path(cache_dir) / model_id.replace("/", "--")
    if not target.is_dir():
        shutil.copytree(src, target)
    return str(target)


def failing_download(model_id: str) -> str:
    raise ConnectionError(f"cannot reach the hub for {model_id}")


def _path_settings(value, found=None) -> list:
    found = [] if found is None else found
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "pretrained_model_name_or_path":
                found.append(item)
            else:
                _path_settings(item, found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _path_settings(item, found)
    return found


@pytest.fixture
def calls():
    CALLS.clear()
    yield CALLS
    CALLS.clear()


def test_model_resource_rewrites_every_path_and_downloads_once(tmp_path, tiny_model_dir, calls):
    cfg = Config.fromfile(SEED_CFG)
    assert "pretrained_model_name_or_path" in cfg.model.llm and cfg.tokenizer["pretrained_model_name_or_path"] \
        == "internlm/internlm2-chat-7b"
    cfg["model_resource"] = dict(fn=fake_download, args=dict(model_id="internlm/internlm2-chat-7b",
                                                             src=tiny_model_dir, cache_dir=str(tmp_path)))
    assert apply_model_resource(cfg) is cfg
    local = str(tmp_path / "internlm--internlm2-chat-7b")
    assert calls == [{"model_id": "internlm/internlm2-chat-7b"}]
    assert cfg.pretrained_model_name_or_path == local
    assert cfg.model.llm.pretrained_model_name_or_path == local
    assert cfg.tokenizer.pretrained_model_name_or_path == local
    settings = _path_settings({k: v for k, v in cfg.items() if k != "model_resource"})
    assert len(settings) >= 4 and set(settings) == {local}  # llm, tokenizer (shared by dataset and hooks)
    # the tokenizer dict is one object wherever the config uses it: all of them see the local path
    assert cfg.train_dataloader.dataset.tokenizer is cfg.tokenizer
    assert cfg.custom_hooks[0]["tokenizer"]["pretrained_model_name_or_path"] == local
    # the spec keeps the hub id, and a second call does not download again
    assert cfg.model_resource["args"]["model_id"] == "internlm/internlm2-chat-7b"
    apply_model_resource(cfg)
    assert len(calls) == 1
    # the training config now loads from the local copy
    tokenizer = build(cfg.tokenizer, key="tokenizer")
    assert tokenizer.name_or_path == local and len(tokenizer) > 100


def test_model_resource_in_a_config_file_with_a_dotted_path(tmp_path, tiny_model_dir, calls):
    path = tmp_path / "cfg.py"
    path.write_text(SEED_CFG.read_text() + textwrap.dedent(f"""
        model_resource = dict(fn="test_cfg_tools.fake_download",
                              args=dict(model_id=pretrained_model_name_or_path, src={tiny_model_dir!r},
                                        cache_dir={str(tmp_path / 'cache')!r}))
        """))
    cfg = apply_model_resource(Config.fromfile(path, {"pretrained_model_name_or_path": "org/other-model"}))
    local = str(tmp_path / "cache" / "org--other-model")
    assert len(calls) == 1 and Path(local, "config.json").is_file()
    assert set(_path_settings({k: v for k, v in cfg.items() if k != "model_resource"})) == {local}


def test_model_resource_without_args_and_no_spec():
    cfg = {"model": {"llm": {"pretrained_model_name_or_path": "hub/id"}}}
    assert apply_model_resource(cfg) == {"model": {"llm": {"pretrained_model_name_or_path": "hub/id"}}}
    local = str(Path(lmtune.__file__).parent)
    cfg["model_resource"] = dict(fn=lambda: local)  # args may be left out
    apply_model_resource(cfg)
    assert cfg["model"]["llm"]["pretrained_model_name_or_path"] == local


@pytest.mark.parametrize("spec, message", [
    (dict(fn=failing_download, args=dict(model_id="org/m")), r"test_cfg_tools\.failing_download\(model_id='org/m'\) "
                                                            r"failed: ConnectionError: cannot reach the hub"),
    (dict(fn="nosuchpackage_xyz.snapshot_download"), r"nosuchpackage_xyz\.snapshot_download.*cannot be imported"),
    (dict(fn=lambda: "/no/such/dir"), r"returned '/no/such/dir', which is not a directory"),
    (dict(fn=lambda: None), r"returned NoneType"),
    (dict(args=dict(model_id="x")), "fn=<download function>"),
    (dict(fn=failing_download, arg=dict(model_id="x")), "unknown key"),
])
def test_model_resource_failures_are_config_errors_naming_the_function(spec, message):
    cfg = {"model_resource": spec, "pretrained_model_name_or_path": "org/m"}
    with pytest.raises(ConfigError, match=message):
        apply_model_resource(cfg)
    assert cfg["pretrained_model_name_or_path"] == "org/m"


_DIST_SCRIPT = """
import datetime, json, os, sys, time
from pathlib import Path
import torch.distributed as dist
from lmtune.config.model_resource import apply_model_resource

LOG = Path(sys.argv[1])
def download(target):
    rank = dist.get_rank()
    with open(LOG, "a") as fh:
        fh.write(json.dumps({"rank": rank, "event": "start", "t": time.time()}) + "\\n")
    if not Path(target).is_dir():
        time.sleep(1.0)  # a slow download: the other rank must wait for it
        Path(target).mkdir()
    with open(LOG, "a") as fh:
        fh.write(json.dumps({"rank": rank, "event": "end", "t": time.time()}) + "\\n")
    return target

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
cfg = {"model_resource": {"fn": download, "args": {"target": sys.argv[2]}},
       "model": {"llm": {"pretrained_model_name_or_path": "hub/id"}}}
apply_model_resource(cfg)
assert cfg["model"]["llm"]["pretrained_model_name_or_path"] == sys.argv[2]
dist.barrier()
dist.destroy_process_group()
"""


def test_model_resource_downloads_on_rank_0_first(tmp_path):
    script = tmp_path / "dist_download.py"
    script.write_text(_DIST_SCRIPT)
    log, target = tmp_path / "log.jsonl", tmp_path / "model"
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(log), str(target)],
                              env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (1, 0)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    events = [json.loads(line) for line in log.read_text().splitlines()]
    rank0_end = next(e["t"] for e in events if e["rank"] == 0 and e["event"] == "end")
    rank1_start = next(e["t"] for e in events if e["rank"] == 1 and e["event"] == "start")
    assert events[0]["rank"] == 0 and rank1_start >= rank0_end  # rank 1 called fn only after rank 0 finished
    assert sum(1 for e in events if e["event"] == "start") == 2


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
