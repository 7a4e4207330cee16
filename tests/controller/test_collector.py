"""`outpost-controller serve` settles the garbage collector once serving (controller/cli.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from controller.cli import COLLECT_AFTER_ALLOCATIONS

ROOT = Path(__file__).resolve().parents[2]
#: Importing the controller and answering: seconds on the slowest board.
EXIT_TIMEOUT = 60.0
#: In a process of its own: freezing this test process's objects would outlive the test.
PROBE = """
import gc, json
from controller.cli import settle_collector
frozen_before = gc.get_freeze_count()
settle_collector()
print(json.dumps({"frozen_before": frozen_before, "frozen": gc.get_freeze_count(), "threshold": gc.get_threshold()}))
"""


def test_settling_freezes_what_start_up_built_and_collects_the_young_in_larger_batches() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True,
                          timeout=EXIT_TIMEOUT, check=True)
    answer = json.loads(done.stdout)
    assert answer["frozen_before"] == 0
    # The imported modules are start-up's objects: all of them left the collected generations.
    assert answer["frozen"] > 10_000
    threshold = answer["threshold"]
    assert threshold[0] == COLLECT_AFTER_ALLOCATIONS > 700  # above Python's default
    assert threshold[1:] == [10, 10]  # the older generations keep Python's defaults


def test_collection_still_frees_cycles_made_after_settling() -> None:
    # A tunnel that closed leaves cycles behind: they must still be found, frozen objects or not.
    probe = PROBE + """
import weakref
class Node:
    pass
node = Node()
node.me = node
gone = weakref.ref(node)
del node
gc.collect()
print(json.dumps({"freed": gone() is None}))
"""
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                          timeout=EXIT_TIMEOUT, check=True)
    assert json.loads(done.stdout.splitlines()[-1]) == {"freed": True}
