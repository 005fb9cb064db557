"""`python -m vae_lab ...`: the same command line as `python run.py ...` and `vae-lab ...`."""
from vae_lab.cli import main

if __name__ == "__main__":
    main()
