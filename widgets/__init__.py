"""shardlab_widgets: the UI layer (notebook widgets and the panel app). Imports shardlab, never the reverse.

    import panel as pn
    pn.extension(inline=True)   # inline: BokehJS and panel's code travel with the output (no CDN needed)
    from shardlab_widgets import ConfigBuilder, RunLauncher, RunCompare
    builder = ConfigBuilder(); builder

The same components are served by `shardlab app` (shardlab_widgets.app.serve). Each one is a panel
Viewer; `pn.ipywidget(component)` gives an ipywidget where one is needed.
"""

__all__ = ["ConfigBuilder", "RunLauncher", "RunCompare", "TuneRunner", "serve"]


def __getattr__(name: str):
    # Lazy, so `import shardlab_widgets` does not pull in panel and bokeh until a component is used.
    if name == "ConfigBuilder":
        from shardlab_widgets.builder import ConfigBuilder

        return ConfigBuilder
    if name == "RunLauncher":
        from shardlab_widgets.launcher import RunLauncher

        return RunLauncher
    if name == "RunCompare":
        from shardlab_widgets.compare import RunCompare

        return RunCompare
    if name == "TuneRunner":
        from shardlab_widgets.tune import TuneRunner

        return TuneRunner
    if name == "serve":
        from shardlab_widgets.app import serve

        return serve
    raise AttributeError(f"module 'shardlab_widgets' has no attribute {name!r}")
