"""The Python half of the launcher scripts (`launchers/pretrain_*.sh`).

`deepspeed launchers/pretrain_moc_1b.sh ...` makes DeepSpeed run the script with Python on every
rank (`python -u script --local_rank=N ...`). Each launcher is therefore valid bash *and* valid
Python: bash reads its top, Python reads its bottom, which calls `run(recipe)` here.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(recipe: str) -> None:
    """Run the pretraining entry point on `launchers/configs/<recipe>.yaml` with this process's
    command-line arguments (overrides like train.lr=1e-3, --dry-run, --local_rank), plus the
    EP / TP environment variables as the bash half reads them."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    os.chdir(ROOT)
    from megatron_moc.training.pretrain import main

    config = os.path.join(ROOT, "launchers", "configs", f"{recipe}.yaml")
    sizes = [f"train.{key}={os.environ[var]}" for var, key in
             (("EP", "expert_model_parallel_size"), ("TP", "tensor_model_parallel_size"))
             if os.environ.get(var)]
    main(["--config", config, *sys.argv[1:], *sizes])
