"""``python -m dfbatch``: the ``dfbatch`` command line (see ``dfbatch.cli``)."""

from dfbatch.cli import main

if __name__ == "__main__":
    main(prog_name="dfbatch")
