"""Keeping a job process from importing packages it does not use.

peft and transformers import bitsandbytes whenever it is installed (peft at
`import peft`), which costs a job 1.5-5 s of start-up on a 2-core CPU before
any work. Only a QLoRA stage (4-bit weights) and a bitsandbytes optimizer
(`paged_adamw_*`, `*8bit*`, `*bnb*`) use it, so every other job hides it
first: with None in sys.modules, `importlib.util.find_spec` answers None and
`import bitsandbytes` raises ImportError, which both libraries take as "not
installed". Called only at a job process's entry (cli.py), never inside a
process that may train a QLoRA stage later (the tests' in-process jobs).

Standard library only.
"""

from __future__ import annotations

import sys

BITSANDBYTES = "bitsandbytes"


def uses_bitsandbytes(quantized: bool, optim: str | None) -> bool:
    """Whether a stage needs bitsandbytes: 4-bit weights, or one of its optimizers."""
    optim = str(optim or "")
    return quantized or "paged" in optim or "bnb" in optim or "8bit" in optim


def hide_bitsandbytes() -> bool:
    """Make bitsandbytes look absent in this process; False when it is already imported."""
    if sys.modules.get(BITSANDBYTES) is not None:
        return False
    sys.modules[BITSANDBYTES] = None
    return True
