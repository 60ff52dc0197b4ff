"""Print the README's two opening commands, one a line: the first two ```bash blocks, before any prose.

.ci/run runs exactly these, so CI fails whenever the README's first command fails for a user.
"""

import re
import sys
from pathlib import Path


def opening_commands(readme: str) -> list[str]:
    """The commands of the fenced bash blocks that open ``readme`` (after its title), in order."""
    body = readme.split("\n", 1)[1] if readme.startswith("# ") else readme
    commands: list[str] = []
    end = 0
    for match in re.finditer(r"\s*```bash\n(.*?)\n```\n", body, re.S):
        if match.start() != end:  # prose before this block: the opening commands ended
            break
        commands.append(match.group(1).strip())
        end = match.end()
    return commands


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    found = opening_commands(path.read_text(encoding="utf-8"))
    if len(found) != 2 or any("\n" in c for c in found):
        sys.exit(f"{path}: expected two one-line bash blocks right after the title, found {found!r}")
    print("\n".join(found))
