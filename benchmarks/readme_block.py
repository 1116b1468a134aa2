"""Writing a benchmark's table into benchmarks/README.md between its markers."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent / "README.md"


def write_block(name: str, heading: str, text: str) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->`, or add it at the end
    under `## heading` the first time."""
    body = README.read_text()
    block = f"<!-- {name}:start -->\n{text}\n<!-- {name}:end -->"
    if f"<!-- {name}:start -->" in body:
        body = re.sub(rf"<!-- {name}:start -->.*<!-- {name}:end -->", lambda _: block, body, flags=re.S)
    else:
        body = body.rstrip() + f"\n\n## {heading}\n\n" + block + "\n"
    README.write_text(body)
