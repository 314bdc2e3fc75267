"""shardlab_widgets: the UI layer (notebook widgets and the panel app). Imports shardlab, never the reverse."""
