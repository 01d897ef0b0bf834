"""`python -m meld_dali ...` == `meld-dali ...` (torchrun needs the module form)."""

from meld_dali.cli import main

if __name__ == "__main__":
    main()
