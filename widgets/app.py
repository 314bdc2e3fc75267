"""The served dashboard (`shardlab app --port N`): build, run, compare and tune in one page.

The same components as in the notebooks: a ConfigBuilder, a RunLauncher that runs the builder's
current plan, a RunCompare over the run store (`shardlab app --runs DIR`, else $SHARDLAB_RUNS_DIR,
else ./runs), and a TuneRunner whose trials land in that store. Each browser
session gets its own objects. The server listens on 127.0.0.1 only: it can start processes, so it is
not for the network. Other users of the same machine (or an SSH tunnel) can still reach that port, so
the page also asks for a token, as JupyterLab does: a random one printed at start
(http://127.0.0.1:PORT/?token=...), or the one given with `shardlab app --token`. The first visit
with it sets an HttpOnly cookie and redirects to the address without the token (`token_guard`); a
request with neither gets a page saying so, and no builder, launcher or run store. A spinner in
the header turns while the server is busy with anything the page asked for (panel's busy state), so
no wait goes without a sign.
"""

from __future__ import annotations

import hmac
import html
import secrets

import panel as pn

from shardlab.run.store import default_runs_dir
from shardlab_widgets.builder import ConfigBuilder
from shardlab_widgets.compare import RunCompare
from shardlab_widgets.launcher import RunLauncher
from shardlab_widgets.tune import TuneRunner


def create_app(runs_dir: str | None = None) -> pn.viewable.Viewable:
    """One session's dashboard: Build / Run / Compare tabs sharing the builder's plan, and Tune."""
    runs_dir = runs_dir or default_runs_dir()
    builder = ConfigBuilder()
    launcher = RunLauncher(builder, out=runs_dir)
    compare = RunCompare(runs_dir)
    # the store is the server's choice (--runs): a browser must not point it at other folders
    compare.runs_dir.disabled = True
    tune = TuneRunner(out=runs_dir)
    tabs = pn.Tabs(("Build", builder), ("Run", launcher), ("Compare", compare), ("Tune", tune),
                   dynamic=False, sizing_mode="stretch_width", css_classes=["sl-app-tabs"])
    # The store changes while the app is open: re-read it whenever Compare is shown.
    tabs.param.watch(lambda ev: ev.new == 2 and compare.refresh(), "active")
    title = pn.pane.Markdown("# shardlab — FSDP / DeepSpeed ZeRO config explorer", margin=(0, 10))
    busy = pn.indicators.LoadingSpinner(value=False, size=28, css_classes=["sl-busy"], margin=(18, 10))
    pn.state.sync_busy(busy)  # spins while any server callback of this session runs
    store = pn.pane.HTML(f'<span class="sl-runs-dir" style="color:#666">run store: {html.escape(str(runs_dir))}</span>', margin=(24, 10))
    header = pn.Row(title, busy, pn.layout.HSpacer(), store, sizing_mode="stretch_width")
    return pn.Column(header, tabs, sizing_mode="stretch_width")


COOKIE = "shardlab_token"
NEEDS_TOKEN = ("<!doctype html><title>shardlab</title><h1>shardlab</h1><p class='sl-token-needed'>This dashboard needs "
               "its token: open the address <code>shardlab app</code> printed (http://127.0.0.1:PORT/?token=...).</p>")


def token_guard(expected: str):
    """A Bokeh auth provider: a request is let in with the token's cookie, or with ?token=... once, which
    sets the cookie (HttpOnly, SameSite=Strict) and redirects to the same address without the token, so
    it stays out of the address bar, the history, Referer headers and access logs from then on, as
    JupyterLab's login does. Anything else is sent to /login, a page saying a token is needed."""
    from urllib.parse import parse_qsl, urlencode, urlsplit

    import tornado.web
    from bokeh.server.auth_provider import AuthProvider

    def matches(got) -> bool:
        return bool(got) and hmac.compare_digest(str(got).encode(), expected.encode())

    class Login(tornado.web.RequestHandler):
        def get(self):
            self.set_status(403)
            self.finish(NEEDS_TOKEN)

    class Guard(AuthProvider):
        login_url = "/login"
        login_handler = Login

        @property
        def get_user(self):
            return self._user

        def _user(self, handler):
            if matches(handler.get_cookie(COOKIE)):
                return "shardlab"
            if not matches(handler.get_query_argument("token", None)):
                return None
            handler.set_cookie(COOKIE, expected, path="/", httponly=True, samesite="Strict")
            if handler.request.method != "GET":
                return "shardlab"
            url = urlsplit(handler.request.uri)
            rest = urlencode([(k, v) for k, v in parse_qsl(url.query, keep_blank_values=True) if k != "token"])
            handler.redirect(url.path + (f"?{rest}" if rest else ""))
            raise tornado.web.Finish()

    return Guard()


def serve(port: int = 5006, show: bool = False, runs_dir: str | None = None, threaded: bool = False,
          token: str | None = None):
    """Serve the dashboard at http://127.0.0.1:PORT/ (blocks unless `threaded`, which returns the server).

    token: what a browser must present once as ?token=... (then a cookie carries it); None makes a random one, "" serves without one."""
    token = secrets.token_urlsafe(24) if token is None else token
    import shardlab.models

    shardlab.models.SERVER_SOURCES_ALLOWED = False  # no server file or module named from a browser
    pn.extension()
    url = f"http://127.0.0.1:{port}/" + (f"?token={token}" if token else "")
    print(f"shardlab app: open {url}", flush=True)
    return pn.serve(
        {"/": lambda: create_app(runs_dir)},
        port=port,
        address="127.0.0.1",
        websocket_origin=[f"127.0.0.1:{port}", f"localhost:{port}"],
        show=show,
        title="shardlab",
        threaded=threaded,
        print_url=False,
        **({"auth_provider": token_guard(token)} if token else {}),
    )
