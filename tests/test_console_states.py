"""The console's final states are the protocol's: console.js keeps its own copy (it runs
in the browser, with no build step), so this test holds the two together."""

from __future__ import annotations

import json
import re
from pathlib import Path

from edgerun.protocol import FINAL_STATES

CONSOLE = Path(__file__).resolve().parent.parent / "edgerun/scheduler/api/web/static/console.js"


def test_the_consoles_final_states_are_the_protocols() -> None:
    found = re.search(r"^const FINAL = new Set\((\[[^\]]*\])\);$", CONSOLE.read_text(),
                      re.MULTILINE)
    assert found is not None, "console.js no longer declares FINAL as a Set literal"
    assert set(json.loads(found.group(1))) == {str(s) for s in FINAL_STATES}
