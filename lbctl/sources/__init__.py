"""Where cluster state comes from.

``base``: the ``Source`` interface, ``SourceUnavailable``, the join into a snapshot;
``validate``: API-server style validation of objects given as plain dicts;
``manifests``: the directory source (files, YAML, last good objects, the state file).
"""
