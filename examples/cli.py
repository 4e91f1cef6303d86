"""LightningCLI over the digits CNN: every lightning_lip callback configured from YAML.

python examples/cli.py fit --config examples/config.yaml
"""

from digits import DigitsCNN, DigitsDataModule
from lightning.pytorch.cli import LightningCLI

if __name__ == "__main__":
    LightningCLI(DigitsCNN, DigitsDataModule)
