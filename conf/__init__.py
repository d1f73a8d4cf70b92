"""The Hydra configs; pyproject.toml installs this folder as ``contrastive.conf`` so that ``pkg://contrastive.conf``
finds them in the source tree and in an installed wheel alike (Hydra needs this file to read a package)."""
