"""Distill a ResNet-18 teacher into a small student and report what the compression costs: kd/cli.py.

    python run.py --config configs/fashion_mnist.yaml
"""
import sys

from kd.cli import main

if __name__ == "__main__":
    sys.exit(main())
