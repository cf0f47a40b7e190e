"""``python -m loractl``: the same command line as the ``loractl`` script."""

from loractl.client.cli import main

if __name__ == "__main__":
    main(prog_name="loractl")
