"""python -m eagle_fast.serve — the OpenAI-compatible server and chat page (console script:
eagle-fast-serve).

    python -m eagle_fast.serve --model ckpt/ --port 8000
    python -m eagle_fast.serve --model eagle-tiny-x5 --api-key secret --parallel 2

Every ServeConfig field is a flag of the same name with dashes (--max-image-pixels, ...). It binds
127.0.0.1 unless --host says otherwise; open http://127.0.0.1:8000/ for the chat page.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

from eagle_fast.serve.config import ServeConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eagle_fast.serve", description=__doc__.split("\n\n")[0])
    hints = typing.get_type_hints(ServeConfig)
    for f in dataclasses.fields(ServeConfig):
        flag, hint, help = "--" + f.name.replace("_", "-"), hints[f.name], f.metadata.get("help", "")
        if "default" not in help and f.default is not dataclasses.MISSING:
            help += " (default: %(default)s)"
        if f.default is dataclasses.MISSING:
            parser.add_argument(flag, required=True, help=help)
        elif hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        else:
            kind = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
            parser.add_argument(flag, type=kind, default=f.default, metavar=kind.__name__.upper(), help=help)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    if args["api_key"] is None:
        args["api_key"] = os.environ.get("EAGLE_FAST_API_KEY") or None
    config = ServeConfig(**args).validate()
    try:
        import uvicorn

        from eagle_fast.serve.app import create_app
    except ImportError as exc:
        print(f"eagle_fast.serve needs the serve extra: pip install 'eagle_fast[serve]' ({exc})", file=sys.stderr)
        return 2
    app = create_app(config)
    print(f"eagle_fast.serve: {config.served_name()} on http://{config.host}:{config.port}/", file=sys.stderr)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
