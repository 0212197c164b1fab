"""Router-only finetuning of a Meta-Attention model, on Accelerate.

    python recipes/router_finetune.py --config recipes/configs/smollm2_demo.yaml
    accelerate launch --config_file recipes/accelerate/multi_gpu_2.yaml \
        recipes/router_finetune.py --config recipes/configs/smollm2_gpu.yaml
    ... --resume            continue from the last checkpoint in output_dir
    ... --overwrite         start over in an existing output_dir

The same run is `ma-convert finetune --config X.yaml`. The library half is ma_convert.training.
"""

import sys

from ma_convert.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
