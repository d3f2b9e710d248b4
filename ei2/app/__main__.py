"""`python -m ei2.app [--host 127.0.0.1] [--port 7860] [--runs runs]`: serve the web page and print its URL.

On a GPU box: start it there, then `ssh -L 7860:localhost:7860 host` and open http://localhost:7860 here.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import Ei2Error, cli_main
from ..files import check_writable_dir
from .jobs import REPO


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ei2.app", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; default: "
                                                        "this machine only, reach it from elsewhere by SSH port forwarding)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--runs", default="runs", help="folder of the run folders (default: runs, as ei2.train's runs/<name>)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise Ei2Error(f"--port {args.port} is not a port number (1..65535)")
    runs = check_writable_dir(Path(args.runs).expanduser().resolve(), "--runs folder")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    try:  # Gradio is the optional `app` extra: imported here so that a missing extra is one line, not a traceback
        from .page import build
    except ModuleNotFoundError as e:
        raise Ei2Error(f"the web page needs {e.name}: pip install -e \".[app]\" (from the repository root)") from None
    page = build(runs).queue(default_concurrency_limit=1)
    try:
        page.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True,
                    allowed_paths=[str(runs), str(REPO / "assets")], ssr_mode=False, show_error=True)
    except OSError as e:
        raise Ei2Error(f"cannot listen on {args.host}:{args.port} ({e}); pass another --port") from None
    host = "localhost" if args.host in ("0.0.0.0", "::") else args.host
    print(f"ei2 app: http://{host}:{page.server_port}  (runs in {runs}; Ctrl-C stops)", flush=True)
    try:
        page.block_thread()
    except KeyboardInterrupt:
        page.close()


if __name__ == "__main__":
    main(sys.argv[1:])
