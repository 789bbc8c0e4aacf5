"""Render a page of the published asv dashboard (asv_bench/html, after ``asv publish``) to
a PNG with headless Chromium: the picture of the README's benchmark section.

    python tools/asv_screenshot.py                                  # docs/asv_dashboard.png
    python tools/asv_screenshot.py --page "#bench_layers.Inference.time_forward" \\
        --out /tmp/inference.png --size 1400,900

The dashboard's graphs are drawn by JavaScript from JSON files that a file:// page may
not load, so the HTML is served on 127.0.0.1 (a free port, this process only) while
Chromium takes the picture. Needs ``chromium`` (Debian: ``apt-get install chromium``) or
``$CHROMIUM``. Look at the picture before committing it, and name the host beside it.

asv's index.html loads jQuery, Flot, Bootstrap and a few plugins from public CDNs, which
a machine without general internet access cannot reach (the page then shows "Can not
determine continental origin of swallow"). Where Debian's packages of them are installed
(``apt-get install libjs-jquery libjs-jquery-flot libjs-bootstrap
libjs-jquery-stupidtable node-blueimp-md5``), a copy of the HTML is served with those
local files in place of the CDN ones (Debian's Flot is 4.x, whose one-file build
``jquery.flot.pack.js`` holds the time, selection, categories and axis-label plugins;
asv's bar-chart plugin orderBars is left out: the line graphs do not use it). ``--cdn``
serves the published HTML unchanged.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The default page: LSTM inference (lstm-b64) of rnnfast's compiled backends beside PyTorch
# and ONNX Runtime, one line each, over the commits run.
DEFAULT_PAGE = ("#bench_layers.Inference.time_forward?p-workload=%27lstm-b64%27"
                "&p-backend=%27auto%27&p-backend=%27cython%27&p-backend=%27numba%27"
                "&p-backend=%27torch%27&p-backend=%27onnxruntime%27&p-backend=%27openvino%27")


JS = "/usr/share/javascript"
# CDN file (the tail of its URL in asv's index.html) -> Debian's file, or None to drop it
VENDOR = {
    "jquery-3.3.1.min.js": f"{JS}/jquery/jquery.min.js",
    "flot/0.8.3/jquery.flot.min.js": f"{JS}/flot/jquery.flot.pack.js",
    "jquery.flot.time.min.js": None,
    "jquery.flot.selection.min.js": None,
    "jquery.flot.categories.min.js": None,
    "jquery.flot.orderBars.js": None,
    "stupidtable.min.js": f"{JS}/jquery-stupidtable/stupidtable.min.js",
    "md5.min.js": f"{JS}/blueimp-md5/md5.min.js",
    "bootstrap.min.js": f"{JS}/bootstrap/js/bootstrap.min.js",
    "bootstrap.min.css": f"{JS}/bootstrap/css/bootstrap.min.css",
}


def _local_copy(html: str, tmp: str) -> str:
    """A copy of `html` whose index.html loads the Debian files instead of the CDN's."""
    out = os.path.join(tmp, "html")
    shutil.copytree(html, out)
    os.makedirs(os.path.join(out, "vendor"))
    idx = os.path.join(out, "index.html")
    text = open(idx, encoding="utf-8").read()

    def repl(m):
        url = m.group(2)
        for tail, local in VENDOR.items():
            if url.endswith(tail):
                if local is None:
                    return ""
                dst = os.path.join("vendor", os.path.basename(local))
                shutil.copy(local, os.path.join(out, dst))
                # the CDN files' integrity hashes are not those of Debian's builds
                tag = re.sub(r'\s(integrity|crossorigin|referrerpolicy)="[^"]*"', "", m.group(0))
                return tag.replace(url, dst)
        return m.group(0)
    # <script ... src="https://..."></script> and <link ... href="https://...">
    text = re.sub(r'(<script[^>]*src="(https://[^"]+)"[^>]*>\s*</script>)', repl, text)
    text = re.sub(r'(<link[^>]*href="(https://[^"]+\.css)"[^>]*>)', repl, text)
    # Flot 4's one-file build has its own axis-label plugin: asv's 0.8 copy would register twice
    text = re.sub(r'<script[^>]*src="jquery.flot.axislabels.js"[^>]*>\s*</script>', "", text)
    # Flot 4 draws the legend in SVG, filled black unless styled (the style of Flot's examples)
    text = text.replace("</head>", "<style>.legendLayer .background { fill: rgba(255,255,255,0.9); "
                        "stroke: rgba(0,0,0,0.6); stroke-width: 1; } .legendLayer text { fill: #222; }"
                        "</style>\n</head>", 1)
    with open(idx, "w", encoding="utf-8") as fh:
        fh.write(text)
    return out


def _chromium() -> str:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    sys.exit("asv_screenshot: no chromium found (apt-get install chromium, or set CHROMIUM)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--html", default=os.path.join(ROOT, "asv_bench", "html"), help="asv's html_dir")
    ap.add_argument("--page", default=DEFAULT_PAGE, help="what follows index.html in the URL")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "asv_dashboard.png"))
    ap.add_argument("--size", default="1400,900", help="window size, W,H")
    ap.add_argument("--wait-ms", type=int, default=20000, help="virtual time for the page's scripts")
    ap.add_argument("--cdn", action="store_true", help="serve the published HTML as it is (CDN scripts)")
    a = ap.parse_args(argv)
    if not os.path.exists(os.path.join(a.html, "index.html")):
        sys.exit(f"asv_screenshot: no {a.html}/index.html: run `asv publish` in asv_bench first")
    with tempfile.TemporaryDirectory() as tmp:
        html = a.html
        if not a.cdn:
            if not os.path.exists(VENDOR["flot/0.8.3/jquery.flot.min.js"]):
                sys.exit("asv_screenshot: Debian's JS packages are missing (see the module docstring), or pass --cdn")
            html = _local_copy(a.html, tmp)
        return _shoot(a, html)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _shoot(a, html: str) -> int:
    handler = functools.partial(_Quiet, directory=html)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/index.html{a.page}"
    cmd = [_chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
           f"--window-size={a.size}", f"--virtual-time-budget={a.wait_ms}",
           f"--screenshot={os.path.abspath(a.out)}", url]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    finally:
        srv.shutdown()
    if r.returncode != 0 or not os.path.exists(a.out):
        sys.stderr.write(r.stderr[-2000:])
        return 1
    print(f"{url}\n-> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
