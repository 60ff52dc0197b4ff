"""XTuner 0.2.0's prompt templates and their renderings, for lmtune's ``xtuner.utils`` compatibility.

Run with the python of benchmarks/.venv-xtuner (``setup_xtuner_env.sh``), benchmarks/xtuner_stubs first
on PYTHONPATH. It imports XTuner's own ``PROMPT_TEMPLATE`` and ``template_map_fn`` (no lmtune code) and
writes two files:

* ``lmtune/compat/xtuner/xtuner_prompt_templates.json``: every template's fields as XTuner 0.2.0 has
  them. ``from xtuner.utils import PROMPT_TEMPLATE`` in a config gives these, so an XTuner config
  trains the text XTuner trained.
* ``tests/fixtures/xtuner_template_renderings.json``: XTuner's own ``template_map_fn`` output for probe
  conversations (one round, several rounds with a system message), per template; the tests render
  the same conversations with lmtune and compare.

    PYTHONPATH=benchmarks/xtuner_stubs benchmarks/.venv-xtuner/bin/python benchmarks/xtuner_templates.py
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROBES = {
    "one_round": [{"input": "What is 2+2?", "output": "4."}],
    "system_and_rounds": [
        {"system": "You are terse.", "input": "Name a colour.", "output": "Blue."},
        {"input": "Another one?", "output": "Red."},
        {"input": "And a third?", "output": "Green, then."},
    ],
}


def main() -> None:
    import xtuner
    from xtuner.dataset.map_fns import template_map_fn_factory
    from xtuner.utils import PROMPT_TEMPLATE

    templates = {name: {key: (list(value) if isinstance(value, (list, tuple)) else value)
                        for key, value in dict(template).items()}
                 for name, template in PROMPT_TEMPLATE.items()}
    renderings = {}
    for name, template in PROMPT_TEMPLATE.items():
        map_fn = template_map_fn_factory(template=template)
        renderings[name] = {}
        for probe, conversation in PROBES.items():
            try:
                renderings[name][probe] = map_fn({"conversation": copy.deepcopy(conversation)})["conversation"]
            except AttributeError as exc:  # a template without SYSTEM fails on a system message in XTuner
                renderings[name][probe] = {"error": f"{type(exc).__name__}: {exc}"}
    source = {"generated_by": "benchmarks/xtuner_templates.py", "xtuner_version": xtuner.__version__}
    (REPO / "lmtune" / "compat" / "xtuner" / "xtuner_prompt_templates.json").write_text(
        json.dumps({**source, "templates": templates}, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (REPO / "tests" / "fixtures" / "xtuner_template_renderings.json").write_text(
        json.dumps({**source, "probes": PROBES, "renderings": renderings}, indent=1, ensure_ascii=False) + "\n",
        encoding="utf-8")
    print(f"{len(templates)} templates of XTuner {xtuner.__version__} written")


if __name__ == "__main__":
    main()
