"""Compare contrastive self-supervised architectures (SimCLR, memory bank, MoCo, SwAV) on one backbone and budget."""


def _checkout_configs() -> None:
    """The configs are the package ``contrastive.conf`` (Hydra reads ``pkg://contrastive.conf``). A wheel carries
    them inside the package (pyproject.toml maps conf/ there); a checkout keeps them beside it, in conf/, which is
    registered here, so a checkout works uninstalled too (PYTHONPATH=.) and a copy of one reads its own configs."""
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    conf = here.parent / "conf"
    if (here / "conf").is_dir() or not (conf / "__init__.py").is_file() or f"{__name__}.conf" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        f"{__name__}.conf", conf / "__init__.py", submodule_search_locations=[str(conf)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    globals()["conf"] = module


_checkout_configs()
