#!/usr/bin/env bash
""":"
# Pretrain recipe launchers/configs/moe_1b.yaml. Valid bash and valid Python, so both work:
#   deepspeed launchers/pretrain_moe_1b.sh [section.key=value ...]   (DeepSpeed runs it with Python)
#   bash launchers/pretrain_moe_1b.sh [--dry-run] [section.key=value ...]
#   LAUNCHER=torchrun bash launchers/pretrain_moe_1b.sh ...
RECIPE=moe_1b
. "$(dirname "$0")/_launch.sh"
":"""
import os, sys  # noqa: E401  (Python half: one rank under the deepspeed launcher)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _entry import run  # noqa: E402
run("moe_1b")
