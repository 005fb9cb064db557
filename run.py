"""Entry point: `python run.py task=train`, `python run.py task=evaluate evaluate.checkpoint=PATH`.

Every setting is a Hydra override; see conf/config.yaml and README.md.
"""
from vae_lab.entry import main

if __name__ == "__main__":
    main()
