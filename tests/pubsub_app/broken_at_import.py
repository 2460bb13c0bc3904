"""A handler module that fails at import with something other than ImportError."""

raise RuntimeError("settings for the mail server are missing")
