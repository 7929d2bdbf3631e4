"""Dataset generators shipped with ftflow (`source: generator:<name>`)."""

from __future__ import annotations

from . import column_mapping

# name -> function(**args) returning {"train": rows, "validation": rows, "test": rows}
GENERATORS = {
    "column_mapping": column_mapping.generate,
}
