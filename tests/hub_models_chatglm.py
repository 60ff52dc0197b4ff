"""A local ChatGLM3 / ChatGLM2 model directory in the hub's own layout (offline), for the ChatGLM port's tests
and tools/port_export_check.py.

The weights and config.json come from ``tests/fixtures/ports/<fixture>`` (made with the original code by
tools/port_refs/chatglm.py), the SentencePiece ``tokenizer.model`` from ``tests/fixtures/ports/chatglm_tokenizer``
(trained as ChatGLM's was; the original tokenizers' ids on it are recorded beside it), the tokenizer_config.json
is the hub's, and the code files are stand-ins (lmtune must never run them; an export must copy them).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hub_models import FIXTURES, STAND_IN_CODE

TOKENIZER_FIXTURE = FIXTURES / "chatglm_tokenizer"
# the stand-ins must not run, but their text tells ChatGLM3's tokenizer (role tokens) from ChatGLM2's
CHATGLM3_TOKENIZER_CODE = STAND_IN_CODE + "# ChatGLM3: <|system|> <|user|> <|assistant|> <|observation|>\n"
CHATGLM3_TOKENIZER_CONFIG = {"name_or_path": "THUDM/chatglm3-6b", "remove_space": False, "do_lower_case": False,
                             "tokenizer_class": "ChatGLMTokenizer",
                             "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}


def chatglm_dir(root: Path, fixture: str = "chatglm3", chatglm2: bool = False, **tokenizer_config) -> Path:
    """A hub-layout ChatGLM repository: the fixture's config.json and weights, stand-in code files, the committed
    tokenizer.model and the hub's tokenizer_config.json."""
    target = root / f"{fixture}{'_v2' if chatglm2 else ''}"
    if (target / "config.json").is_file():
        return target
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(FIXTURES / fixture / name, target / name)
    shutil.copyfile(TOKENIZER_FIXTURE / "tokenizer.model", target / "tokenizer.model")
    for name in ("configuration_chatglm.py", "modeling_chatglm.py", "quantization.py"):
        (target / name).write_text(STAND_IN_CODE)
    (target / "tokenization_chatglm.py").write_text(STAND_IN_CODE if chatglm2 else CHATGLM3_TOKENIZER_CODE)
    config = {**CHATGLM3_TOKENIZER_CONFIG, **tokenizer_config}
    if chatglm2:
        config["name_or_path"] = "THUDM/chatglm2-6b"
    (target / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return target
