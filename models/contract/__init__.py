"""The bundle, the contract between training and serving: its manifest, trust checks, files, index.

``manifest`` (file layout and schema), ``trust`` (origins and signatures), ``bundle`` (writing and
verified reading of the files) and ``index`` (which bundles a repository holds): each imports only
those before it.
"""
