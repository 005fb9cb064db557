"""`python -m vae_lab ...`: the same command line as `python run.py ...` and `vae-lab ...`."""
from vae_lab.entry import main

if __name__ == "__main__":
    main()
