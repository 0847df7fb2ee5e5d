"""``python -m medfocus.training.demo_lvlm FOLDER``: (re)evaluate a trained demo folder and rewrite its card."""

import sys

import torch

from medfocus.training.demo_lvlm.evaluate import evaluate_and_write_card

if len(sys.argv) != 2:
    sys.exit("usage: python -m medfocus.training.demo_lvlm FOLDER")
torch.set_num_threads(2)
evaluate_and_write_card(sys.argv[1])
