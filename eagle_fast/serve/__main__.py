"""python -m eagle_fast.serve — the OpenAI-compatible server and chat page (console script:
eagle-fast-serve).

    python -m eagle_fast.serve --model ckpt/ --port 8000
    python -m eagle_fast.serve --model eagle-tiny-x5 --api-key secret --parallel 2

Every ServeConfig field is a flag of the same name (--max_image_pixels, or --max-image-pixels). It binds
127.0.0.1 unless --host says otherwise; open http://127.0.0.1:8000/ for the chat page.
"""

from __future__ import annotations

import os
import sys

from eagle_fast.cli import ConfigParser
from eagle_fast.serve.config import ServeConfig


def parse(argv: list[str] | None = None) -> ServeConfig:
    p = ConfigParser("python -m eagle_fast.serve", __doc__.split("\n\n")[0])
    p.add_config(ServeConfig)
    given = p.parse_given(argv)
    if given.get("api_key") is None:
        given["api_key"] = os.environ.get("EAGLE_FAST_API_KEY") or None
    try:
        return ServeConfig(**given).validate()
    except ValueError as e:
        p.error(str(e))


def main(argv: list[str] | None = None) -> int:
    config = parse(argv)
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
