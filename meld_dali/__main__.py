"""`python -m meld_dali ...` == `meld-dali ...` (torchrun needs the module form)."""

if __name__ == "__main__":
    # first, before the slow imports: a rank whose torchrun dies in the meantime stops too
    from meld_dali.signals import stop_with_launcher

    stop_with_launcher()
    from meld_dali.cli import main

    main()
