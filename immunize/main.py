"""The `immunize` command: `immunize bench ...` runs the benchmark, `immunize import-gguf ...` turns a GGUF file into a
model directory, `immunize judges ...` scores generations with several judges and reports their agreement, anything
else goes to LightningCLI."""
from __future__ import annotations

import sys
from typing import Optional

from immunize.bench.command import bench_main
from immunize.cli import main as cli_main


def main(args: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "bench":
        bench_main(argv[1:])
    elif argv and argv[0] == "import-gguf":
        from immunize.gguf_import import main as import_main

        sys.exit(import_main(argv[1:]))
    elif argv and argv[0] == "judges":
        from immunize.judges.command import main as judges_main

        sys.exit(judges_main(argv[1:]))
    else:
        cli_main(argv)


if __name__ == "__main__":
    main()
